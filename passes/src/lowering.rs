//! The lowering of a per-rank step before codegen describes its kernels: ZeRO-3's parameter
//! gathers moved next to their readers ([`crate::gather_late`]), collectives bucketed
//! ([`crate::bucket`]), causal attention's zeros marked on its matmuls ([`crate::causal`]),
//! then kernels fused ([`crate::fusion`]). Codegen lowers this program,
//! the runtime runs it, and `shardc plan` reports its arena and buckets, so all three see one
//! program.

use crate::bucket::{bucket, BucketSummary, BUCKET_BYTES};
use crate::causal::{mark_causal, CausalSummary};
use crate::fusion::{fuse, FusionSummary};
use shardc_ir::Graph;

/// A lowered step and what each pass did.
pub struct Lowered {
    pub program: Graph,
    pub buckets: BucketSummary,
    pub causal: CausalSummary,
    pub fusion: FusionSummary,
}

/// Buckets and fuses a per-rank step (module doc).
pub fn lower(step: &Graph) -> Lowered {
    let (late, _) = crate::gather_late::gather_late(step);
    let (bucketed, buckets) = bucket(&late, BUCKET_BYTES);
    let (marked, causal) = mark_causal(&bucketed);
    let (program, fusion) = fuse(&marked);
    Lowered { program, buckets, causal, fusion }
}
