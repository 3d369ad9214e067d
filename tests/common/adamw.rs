//! The AdamW update of a bucket of parameters as a `.tir` program (optimizer phase, so fusion
//! makes one multi-tensor kernel of it), for the kernel tests and the kernel benchmark.

/// Parameters of `sizes` elements: inputs `%lr` and `%p{k}`, `%g{k}`, `%m{k}`, `%v{k}`; outputs
/// `%p2_{k}`, `%m2_{k}`, `%v2_{k}` for each k, in that order.
pub fn multi_tensor_adamw(sizes: &[usize]) -> String {
    let mut src = String::from("graph adamw\ninput %lr: f32[]\n");
    for (k, n) in sizes.iter().enumerate() {
        src += &format!("input %p{k}: f32[{n}]\ninput %g{k}: f32[{n}]\ninput %m{k}: f32[{n}]\ninput %v{k}: f32[{n}]\n");
    }
    for (name, v) in [("b1", "0.9"), ("nb1", "0.1"), ("b2", "0.999"), ("nb2", "0.001"), ("eps", "1e-8")] {
        src += &format!("%{name}: f32[] = full() {{dtype = f32, shape = [], value = {v}}} [optimizer]\n");
    }
    let mut outs = Vec::new();
    for (k, n) in sizes.iter().enumerate() {
        src += &format!(
            "%md{k}: f32[{n}] = mul(%m{k}, %b1) [optimizer]\n%mi{k}: f32[{n}] = mul(%g{k}, %nb1) [optimizer]\n\
             %m2_{k}: f32[{n}] = add(%md{k}, %mi{k}) [optimizer]\n%gg{k}: f32[{n}] = mul(%g{k}, %g{k}) [optimizer]\n\
             %vd{k}: f32[{n}] = mul(%v{k}, %b2) [optimizer]\n%vi{k}: f32[{n}] = mul(%gg{k}, %nb2) [optimizer]\n\
             %v2_{k}: f32[{n}] = add(%vd{k}, %vi{k}) [optimizer]\n%sq{k}: f32[{n}] = sqrt(%v2_{k}) [optimizer]\n\
             %de{k}: f32[{n}] = add(%sq{k}, %eps) [optimizer]\n%st{k}: f32[{n}] = div(%m2_{k}, %de{k}) [optimizer]\n\
             %up{k}: f32[{n}] = mul(%st{k}, %lr) [optimizer]\n%p2_{k}: f32[{n}] = sub(%p{k}, %up{k}) [optimizer]\n"
        );
        outs.extend([format!("%p2_{k}"), format!("%m2_{k}"), format!("%v2_{k}")]);
    }
    src += &format!("output {}\n", outs.join(", "));
    src
}
