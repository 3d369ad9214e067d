//! Command-line interface definitions (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// shardc: a compiler for distributed transformer training.
///
/// A model (a Hugging Face config.json directory, or a .tir file in shardc's text IR) goes in;
/// shardc partitions the whole training step (forward, backward, AdamW) over a device mesh with
/// data parallelism (ZeRO 0-3), Megatron tensor parallelism and sequence parallelism, found by
/// an e-graph search; plans what every rank holds and does; fuses its kernels and lowers them
/// through MLIR to PTX and host code; writes a bundle (`compile -o step.shardc`) and trains
/// with it on the CPU, ranks as threads (`run`), checked against the unsharded model and the
/// reference interpreter. The GPU runtime is the next piece. See README.md for the quick start.
#[derive(Debug, Parser)]
#[command(name = "shardc", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Turn a Hugging Face model directory (config.json, optional model.safetensors) into IR.
    Import(ImportArgs),
    /// Parse and verify a .tir (or .json) graph; errors are shown at their source line.
    Check(CheckArgs),
    /// Mean cross-entropy loss of a model on batches of a token file, on the CPU.
    Eval(EvalArgs),
    /// Train a model on a token file on the CPU: compile its step and run it (AdamW; the host
    /// engine, or the reference interpreter with --engine interp).
    Train(TrainArgs),
    /// Token files.
    #[command(subcommand)]
    Data(DataCommand),
    /// What every rank holds and does for one training step: collectives, memory per device,
    /// communication, FLOPs and a predicted step time, read off the compiled step. Exits with
    /// status 3 (after printing the plan) when the plan does not fit its memory budget.
    Plan(PlanArgs),
    /// Compile a model's training step for a mesh and write the per-rank program (.tir), or
    /// with `-o step.shardc` the bundle `shardc run` executes.
    Compile(CompileArgs),
    /// Train with a compiled bundle on this machine's CPU (ranks as threads).
    Run(RunArgs),
    /// What a bundle holds: program, kernels, memory plan, plan, model.
    Inspect(InspectArgs),
    /// Write a checkpoint's weights as a Hugging Face model directory (config.json +
    /// model.safetensors) that transformers and `shardc import` read.
    Export(ExportArgs),
    /// Why a value has its sharding, and which rule put each adjacent collective there.
    Explain(ExplainArgs),
    /// Run compiler passes on a .tir graph (IR in, IR out), e.g. --passes autodiff,
    /// --passes 'shard{sp=1}', --passes 'train-step{dp=dp zero=1 tp=tp}' or
    /// --passes 'train-step{dp=dp zero=1}, fuse' (the step with its fused kernels).
    Opt(OptArgs),
    /// List the IR's ops with their operands and attributes.
    Ops,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// The .tir text IR.
    Tir,
    /// The serde JSON form of the graph.
    Json,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Directory holding config.json (and optionally model.safetensors).
    pub model_dir: PathBuf,
    /// Write the graph here instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Rows per batch in the graph's static shapes.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per row; defaults to the model's maximum positions (at most 1024).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = GraphFormat::Tir)]
    pub format: GraphFormat,
    /// Also output the logits (after the loss).
    #[arg(long)]
    pub logits: bool,
    /// f32 throughout, or bf16 compute copies of the weights and bf16 activations.
    #[arg(long, value_enum, default_value_t = TrainPrecision::F32)]
    pub precision: TrainPrecision,
    /// Write the checkpoint's weights under the graph's parameter names (safetensors), so that
    /// `shardc eval model.tir --weights FILE` evaluates the imported model.
    #[arg(long, value_name = "FILE")]
    pub weights_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The .tir (or .json) files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalPrecision {
    F32,
    F64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub run: ModelAndData,
    /// How many consecutive batches to average over (batch k reads from token k*B*T).
    #[arg(long, default_value_t = 1)]
    pub batches: usize,
    /// Parameters by graph name (safetensors, or a checkpoint directory: its latest); for a .tir
    /// model, or to override a directory's.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Seed for GPT-2-style initialisation when the model has no weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Arithmetic of the reference interpreter.
    #[arg(long, value_enum, default_value_t = EvalPrecision::F32)]
    pub precision: EvalPrecision,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Tokenize a text file byte by byte (vocabulary 256) into an llm.c token file.
    Prepare(PrepareArgs),
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The text file.
    pub text: PathBuf,
    /// Where to write the tokens.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataOrder {
    /// Windows at random offsets, drawn from --seed and the step number (nanoGPT's sampling).
    Random,
    /// llm.c's order: batch k, row b starts at token (k*B + b)*T, wrapping around.
    Sequential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// The compiled step: fused kernels lowered through MLIR to host code, GEMMs, in-process
    /// collectives, one planned arena per rank.
    Host,
    /// The reference interpreter (the oracle the compiled step is checked against).
    Interp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainPrecision {
    /// Everything in f32 (exact comparisons with PyTorch's f32).
    F32,
    /// bf16 compute copies of the weights and bf16 activations; f32 master weights, moments
    /// and loss.
    Bf16Mixed,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: ModelAndData,
    #[command(flatten)]
    pub lp: LoopArgs,
    /// Decoupled weight decay (applied to parameters of rank >= 2 only).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Arithmetic of the step.
    #[arg(long, value_enum, default_value_t = TrainPrecision::F32)]
    pub precision: TrainPrecision,
    /// Start from these weights instead of the model directory's own (or a random
    /// initialisation), on any mesh: a shardc checkpoint (its directory or its
    /// checkpoint.safetensors; the parameters only, the optimizer starts fresh) or a safetensors
    /// file under the model's parameter names.
    #[arg(long, value_name = "WEIGHTS")]
    pub init_from: Option<PathBuf>,
    #[command(flatten)]
    pub par: ParallelArgs,
}

/// The training loop's options, shared by `train` and `run` (the optimizer's constants are part
/// of the compiled step; the schedule, data and checkpoints are the loop's).
#[derive(Debug, Args)]
pub struct LoopArgs {
    /// Optimizer steps to run (in total, counting the steps of a resumed checkpoint).
    #[arg(long)]
    pub steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Learning rate at the end of the cosine decay; defaults to --lr / 10. Equal to --lr with
    /// --warmup 0 gives a constant rate.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Seed for initialisation (models without weights) and random data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DataOrder::Random)]
    pub data_order: DataOrder,
    /// What runs the step: the compiled step on the host, or the reference interpreter.
    #[arg(long, value_enum, default_value_t = Engine::Host)]
    pub engine: Engine,
    /// Threads for the host engine, over all ranks (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A held-out token file: its mean loss (the gathered weights, one device, the reference
    /// interpreter in f32) every --eval-every steps and after the last, as `val_loss`.
    #[arg(long, value_name = "TOKENS")]
    pub val_data: Option<PathBuf>,
    /// Validate every K steps (0: only after the last step); needs --val-data.
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Batches of --val-data per validation (each of the run's batch x seq tokens).
    #[arg(long, default_value_t = 4)]
    pub val_batches: usize,
    /// After training, print where the host engine's time went (per kernel family, GEMMs,
    /// collectives, copies, host-code and interpreted ops) and each rank's arena size (with --json: one
    /// `{"report": ...}` line).
    #[arg(long)]
    pub report: bool,
    /// Write a Chrome/Perfetto trace of the host engine here (one track per rank: every kernel,
    /// GEMM, collective and copy of every step; open it in ui.perfetto.dev).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Print one JSON object per step on stdout and nothing else there.
    #[arg(long)]
    pub json: bool,
    /// Directory for checkpoints: step-NNNNNNNN/checkpoint.safetensors (weights, AdamW moments,
    /// step, data position) and `latest` naming the newest; written at the end, every
    /// --save-every steps, and on Ctrl-C.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Save a checkpoint every K steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Keep only the newest N step directories of --checkpoint (0: keep every one).
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Continue from the checkpoint in this directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A bundle written by `shardc compile ... -o step.shardc`.
    pub bundle: PathBuf,
    /// Token file: llm.c format (magic 20240520) or raw uint16.
    #[arg(long)]
    pub data: PathBuf,
    /// Start from these weights instead of GPT-2-style random initialisation: a Hugging Face
    /// model directory (config.json + model.safetensors), or a safetensors file of whole
    /// parameters under the program's names (a checkpoint of `train` or `run`).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[command(flatten)]
    pub lp: LoopArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint: a `--checkpoint DIR` of train/run (its latest), a step directory in it, or a
    /// checkpoint.safetensors.
    pub checkpoint: PathBuf,
    /// The model directory the run trained (its config.json says the layout to write).
    #[arg(long)]
    pub model: PathBuf,
    /// The output format: `hf` (Hugging Face's layout and names).
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// The directory to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A bundle written by `shardc compile ... -o step.shardc`.
    pub bundle: PathBuf,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How a training step is spread over devices; shared by every command that compiles one.
#[derive(Debug, Clone, Args)]
pub struct ParallelArgs {
    /// Device mesh: `dp=D` data-parallel ranks (each gets 1/D of every batch) and/or `tp=T`
    /// tensor-parallel ranks (Megatron-style: column/row-parallel MLP, head-parallel
    /// attention, vocab-parallel embedding and cross-entropy), e.g. `dp=2,tp=4`. `train` runs
    /// the ranks simulated on this machine.
    #[arg(long)]
    pub mesh: Option<String>,
    /// Let the cost model choose the mesh shape (with --world N; with --mesh the shape is kept),
    /// sequence parallelism and the ZeRO stage (unless --sequence-parallel / --zero fix them)
    /// under the memory budget, and show the ranking. Tensor-parallel placements are always the
    /// e-graph search's.
    #[arg(long)]
    pub auto: bool,
    /// Number of devices for --auto to arrange into dp x tp.
    #[arg(long)]
    pub world: Option<usize>,
    /// ZeRO stage over `dp`: 0 all-reduces gradients; 1 and 2 partition the AdamW moments and
    /// reduce-scatter gradients; 3 also keeps each rank's shard of the parameters and all-gathers
    /// them in the forward pass.
    #[arg(long, default_value_t = 0)]
    pub zero: u8,
    /// Megatron sequence parallelism over `tp`: the norms and residual adds run on sequence
    /// shards; each tensor-parallel all-reduce becomes a reduce-scatter plus an all-gather.
    #[arg(long)]
    pub sequence_parallel: bool,
    /// Device and network numbers (TOML); defaults to the bundled H100 NVLink/InfiniBand model.
    #[arg(long)]
    pub device_model: Option<PathBuf>,
    /// Memory per device the plan must fit in, e.g. 80GiB, 40GB, 1.5TiB or bytes; defaults to the
    /// device model's memory.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Pad the vocabulary to a multiple of this times tp (Megatron's
    /// --make-vocab-size-divisible-by), so that it splits over tensor-parallel ranks.
    #[arg(long)]
    pub pad_vocab_to_multiple_of: Option<usize>,
}

impl TrainPrecision {
    /// The dtype of compute copies and activations.
    pub fn compute_dtype(self) -> shardc_ir::DType {
        match self {
            TrainPrecision::F32 => shardc_ir::DType::F32,
            TrainPrecision::Bf16Mixed => shardc_ir::DType::Bf16,
        }
    }
}

/// The model and the token batches a command runs on.
#[derive(Debug, Args)]
pub struct ModelAndData {
    /// A model directory (config.json [+ model.safetensors]) or a .tir file.
    pub model: PathBuf,
    /// Token file: llm.c format (magic 20240520) or raw uint16.
    #[arg(long)]
    pub data: PathBuf,
    /// Rows per batch.
    #[arg(long)]
    pub batch: usize,
    /// Tokens per row.
    #[arg(long)]
    pub seq: usize,
}

#[derive(Debug, Args)]
pub struct OptArgs {
    /// The .tir (or .json) graph.
    pub file: PathBuf,
    /// The pipeline: passes separated by commas, options in braces (see `shardc_passes::pipeline`).
    #[arg(long)]
    pub passes: String,
    /// Write the result here instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
}

/// A model and the step to compile for it: shared by `plan`, `compile` and `explain`.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// A model directory (config.json) or a .tir file.
    pub model: PathBuf,
    /// Rows per global batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per row; defaults to the model's maximum positions (at most 1024).
    #[arg(long)]
    pub seq: Option<usize>,
    #[command(flatten)]
    pub par: ParallelArgs,
    /// Plans default to bf16 mixed precision, as on the GPU.
    #[arg(long, value_enum, default_value_t = TrainPrecision::Bf16Mixed)]
    pub precision: TrainPrecision,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub step: StepArgs,
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
}

#[derive(Debug, Args)]
pub struct CompileArgs {
    #[command(flatten)]
    pub step: StepArgs,
    /// What to write: the whole per-rank training step, or only its sharded forward pass.
    #[arg(long, value_enum, default_value_t = CompileStage::Step)]
    pub stage: CompileStage,
    /// Write the per-rank program (.tir) here instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Check the compiled step numerically before writing it: one AdamW step on simulated ranks
    /// against the unsharded step (same random parameters and tokens, f64 storage). For models
    /// that fit the CPU (up to 100M parameters).
    #[arg(long)]
    pub check: bool,
    /// Write the training step without fusing its elementwise and row-wise ops into kernels
    /// (`fused` nodes, the unit codegen lowers).
    #[arg(long)]
    pub no_fusion: bool,
    /// Lower every kernel of the fused step and write, per kernel, DIR/NAME.mlir (the
    /// target-independent description), DIR/NAME.sm_80.ptx and DIR/NAME.sm_90.ptx, and
    /// DIR/kernels.json (fused ops, operand and result types, ptxas registers and spills).
    #[arg(long, value_name = "DIR")]
    pub emit_kernels: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompileStage {
    /// Forward, backward, gradient synchronisation and AdamW, per rank.
    Step,
    /// The per-rank forward pass the sharding pass produced (before autodiff).
    Forward,
    /// The forward pass with every value's sharding over `tp` annotated (`@[_, _, tp]`,
    /// `partial(tp)`) on shapes whole over `tp` (one data-parallel rank's batch), before
    /// localize; verified.
    Sharded,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub step: StepArgs,
    /// The value to explain: a forward value (`h0.mlp_up`), a parameter (`h.0.mlp.c_fc.weight`)
    /// or any value of the compiled step (`h0.attn_out_nobias.tp_sum`).
    pub value: String,
}
