//! The interpreter's threads: large outputs are filled in parts, one per worker thread.

use super::real::Real;

/// An output of `len` elements filled by `fill(start, part)` over parts made of whole `unit`s
/// (rows), split across the worker threads when large. Each element is computed by exactly one
/// thread with the same arithmetic, so results do not depend on the thread count.
pub(crate) fn par_fill<T: Real>(len: usize, unit: usize, fill: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; len];
    let unit = unit.max(1);
    let threads = worker_threads().min(len / unit).max(1);
    if threads == 1 || len < 1 << 15 {
        fill(0, &mut out);
        return out;
    }
    let per = (len / unit).div_ceil(threads) * unit;
    std::thread::scope(|scope| {
        for (t, part) in out.chunks_mut(per).enumerate() {
            let fill = &fill;
            scope.spawn(move || fill(t * per, part));
        }
    });
    out
}

/// Threads the interpreter may use for one op: the host's cores, or SHARDC_THREADS.
pub fn worker_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("SHARDC_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    })
}
