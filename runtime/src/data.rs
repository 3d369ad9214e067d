//! Token files and batches.
//!
//! Two formats are read:
//! - llm.c's: a header of 256 little-endian int32 (`[0]` = 20240520, `[1]` = version, `[2]` =
//!   token count), then the tokens: uint16 for version 1, uint32 for version 2.
//! - raw uint16 little-endian tokens with no header (nanoGPT's `train.bin`).
//!
//! Files are memory-mapped and read in place, never read whole or widened. A headerless file
//! whose bytes read as text is refused (it is a text file given to `--data` by mistake).
//!
//! Batches follow llm.c's order: in batch `k` of `B` rows of `T` tokens, row `b` reads the
//! window starting at token `(k*B + b)*T`; the targets are the same window shifted by one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// llm.c's magic number for token files.
pub const LLMC_MAGIC: i32 = 20240520;
const HEADER_BYTES: usize = 256 * 4;

/// A token-file problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct DataError {
    pub path: PathBuf,
    pub message: String,
}

/// Where a token file's bytes are: mapped from the file (never read whole or widened), or
/// owned (parsed from bytes in memory).
#[derive(Debug)]
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn get(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// The tokens of one file, or of several (llm.c's shards: `--data 'dir/train_*.bin'`) read as
/// one sequence in which no window crosses from one file into the next.
#[derive(Clone, Debug)]
pub struct TokenFile {
    /// The path or pattern given.
    pub path: PathBuf,
    shards: Vec<Shard>,
    /// The global index of each shard's first token, and the total.
    starts: Vec<usize>,
    count: usize,
    /// "llm.c v1", "llm.c v2" or "raw uint16" (of the first file), with the file count.
    pub format: String,
}

impl TokenFile {
    /// Maps and checks a token file, or every file a glob pattern (`*`, `?`, `[...]`) matches, in
    /// name order.
    pub fn open(path: &Path) -> Result<TokenFile, DataError> {
        let text = path.to_string_lossy();
        if !text.contains(['*', '?', '[']) {
            return Ok(Self::of(path, vec![Shard::open(path)?]));
        }
        let fail = |message: String| DataError { path: path.into(), message };
        let mut files: Vec<PathBuf> = glob::glob(&text)
            .map_err(|e| fail(format!("not a valid file pattern: {e}")))?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(fail("no file matches this pattern".into()));
        }
        let shards = files.iter().map(|f| Shard::open(f)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::of(path, shards))
    }

    /// Parses the bytes of a token file (`path` is only used in messages).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<TokenFile, DataError> {
        Ok(Self::of(path, vec![Shard::from_bytes(path, bytes)?]))
    }

    /// Several files' tokens as one (in the order given).
    pub fn concat(path: &Path, files: Vec<TokenFile>) -> TokenFile {
        Self::of(path, files.into_iter().flat_map(|f| f.shards).collect())
    }

    fn of(path: &Path, shards: Vec<Shard>) -> TokenFile {
        let mut starts = Vec::with_capacity(shards.len());
        let mut count = 0;
        for s in &shards {
            starts.push(count);
            count += s.len();
        }
        let first = shards.first().map_or("raw uint16", |s| s.format);
        let format = if shards.len() == 1 { first.to_string() } else { format!("{first}, {} files", shards.len()) };
        TokenFile { path: path.into(), shards, starts, count, format }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Token `i` (< [`TokenFile::len`]).
    pub fn get(&self, i: usize) -> u32 {
        let s = self.starts.partition_point(|&st| st <= i) - 1;
        self.shards[s].get(i - self.starts[s])
    }

    /// Tokens `start..start + len` as model inputs.
    pub fn window(&self, start: usize, len: usize) -> impl Iterator<Item = i64> + '_ {
        (start..start + len).map(move |i| self.get(i) as i64)
    }

    /// How many whole batches of `batch` x `seq` the files hold (each batch within one file;
    /// each needs one extra token for the last target).
    pub fn num_batches(&self, batch: usize, seq: usize) -> usize {
        let per = batch.saturating_mul(seq);
        if per == 0 {
            return 0;
        }
        self.shards.iter().map(|s| s.len().saturating_sub(1) / per).sum()
    }

    /// Where row `b` of batch `k` (< [`TokenFile::num_batches`]) starts, in llm.c's order within
    /// each file, file after file.
    pub fn batch_start(&self, k: usize, b: usize, batch: usize, seq: usize) -> usize {
        let per = batch * seq;
        let mut k = k;
        for (s, shard) in self.shards.iter().enumerate() {
            let n = shard.len().saturating_sub(1) / per;
            if k < n {
                return self.starts[s] + (k * batch + b) * seq;
            }
            k -= n;
        }
        unreachable!("batch index checked against num_batches")
    }

    /// A window of `seq + 1` tokens inside one file, chosen by the random number `r` (uniform
    /// over every such window of every file).
    pub fn random_start(&self, r: u64, seq: usize) -> usize {
        let spans: Vec<usize> = self.shards.iter().map(|s| s.len().saturating_sub(seq)).collect();
        let total: usize = spans.iter().sum();
        let mut x = (r % total.max(1) as u64) as usize;
        for (s, &span) in spans.iter().enumerate() {
            if x < span {
                return self.starts[s] + x;
            }
            x -= span;
        }
        0
    }

    /// Batch `k`: (inputs, targets), each `batch * seq` tokens, row-major.
    pub fn batch(&self, k: usize, batch: usize, seq: usize) -> Result<(Vec<i64>, Vec<i64>), DataError> {
        if batch == 0 || seq == 0 || k >= self.num_batches(batch, seq) {
            let need = (k.saturating_add(1)).saturating_mul(batch).saturating_mul(seq).saturating_add(1);
            return Err(DataError {
                path: self.path.clone(),
                message: format!(
                    "batch {k} of {batch} x {seq} tokens needs {need} tokens but the file has {}; use a smaller --batch, --seq or fewer batches",
                    self.len()
                ),
            });
        }
        let (mut x, mut y) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
        for b in 0..batch {
            let start = self.batch_start(k, b, batch, seq);
            x.extend(self.window(start, seq));
            y.extend(self.window(start + 1, seq));
        }
        Ok((x, y))
    }

    /// The largest token id, for checking against a vocabulary.
    pub fn max_token(&self) -> Option<u32> {
        self.shards.iter().filter_map(Shard::max_token).max()
    }
}

/// One token file: memory-mapped, read in place (uint16 or uint32 little-endian), so a file of
/// billions of tokens costs only the pages a batch touches.
#[derive(Clone, Debug)]
struct Shard {
    path: PathBuf,
    bytes: std::sync::Arc<Bytes>,
    /// Where the tokens start, their width in bytes (2 or 4) and their count.
    offset: usize,
    width: usize,
    count: usize,
    /// "llm.c v1", "llm.c v2" or "raw uint16".
    format: &'static str,
}

impl Shard {
    /// Maps and checks a token file.
    pub fn open(path: &Path) -> Result<Shard, DataError> {
        let fail = |e: std::io::Error| DataError { path: path.into(), message: format!("cannot read: {e}") };
        let file = std::fs::File::open(path).map_err(fail)?;
        if file.metadata().map_err(fail)?.len() == 0 {
            return Self::parse(path, Bytes::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only; a token file changed by another process while it is
        // mapped gives other tokens, never unsafety in this process's own memory (the same
        // contract every reader of a mapped data set has).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(fail)?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parses the bytes of a token file (`path` is only used in messages).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Shard, DataError> {
        Self::parse(path, Bytes::Owned(bytes.to_vec()))
    }

    fn parse(path: &Path, store: Bytes) -> Result<Shard, DataError> {
        let fail = |message: String| DataError { path: path.into(), message };
        let bytes = store.get();
        let header_int = |i: usize| i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let (offset, width, count, format) = if bytes.len() >= HEADER_BYTES && header_int(0) == LLMC_MAGIC {
            let version = header_int(1);
            let width = match version {
                1 => 2,
                2 => 4,
                v => {
                    return Err(fail(format!(
                        "llm.c token file version {v} is not supported (1: uint16 tokens, 2: uint32 tokens)"
                    )))
                }
            };
            let count = usize::try_from(header_int(2))
                .map_err(|_| fail(format!("header token count {} is negative", header_int(2))))?;
            let body = bytes.len() - HEADER_BYTES;
            if body != count * width {
                return Err(fail(format!(
                    "header says {count} tokens ({} bytes) but {body} bytes follow it; the file is truncated or not an llm.c token file",
                    count * width
                )));
            }
            (HEADER_BYTES, width, count, if width == 2 { "llm.c v1" } else { "llm.c v2" })
        } else {
            if !bytes.len().is_multiple_of(2) {
                return Err(fail(format!(
                    "{} bytes is neither an llm.c token file (magic {LLMC_MAGIC}) nor raw uint16 tokens (an even number of bytes)",
                    bytes.len()
                )));
            }
            if looks_like_text(bytes) {
                return Err(fail(
                    "looks like text, not tokens (no llm.c header, and its bytes are printable characters); make a token file with `shardc data prepare TEXT -o tokens.bin`"
                        .into(),
                ));
            }
            (0, 2, bytes.len() / 2, "raw uint16")
        };
        Ok(Shard { path: path.into(), bytes: std::sync::Arc::new(store), offset, width, count, format })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Token `i` (< [`Shard::len`]).
    pub fn get(&self, i: usize) -> u32 {
        let at = self.offset + i * self.width;
        let b = &self.bytes.get()[at..at + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes(b.try_into().expect("4 bytes"))
        }
    }

    /// The largest token id, for checking against a vocabulary. A mapped file is read in
    /// chunks through the page cache (`read`), so scanning it does not keep its pages resident
    /// in this process.
    pub fn max_token(&self) -> Option<u32> {
        if self.is_empty() {
            return None;
        }
        let chunk_max = |b: &[u8]| -> u32 {
            if self.width == 2 {
                b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).max().unwrap_or(0)
            } else {
                b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).max().unwrap_or(0)
            }
        };
        if let Bytes::Mapped(_) = *self.bytes {
            use std::io::{Read, Seek};
            if let Ok(mut f) = std::fs::File::open(&self.path) {
                let mut buf = vec![0u8; (1 << 20) / self.width * self.width];
                let (mut left, mut best) = (self.count * self.width, 0u32);
                if f.seek(std::io::SeekFrom::Start(self.offset as u64)).is_ok() {
                    while left > 0 {
                        let n = buf.len().min(left);
                        if f.read_exact(&mut buf[..n]).is_err() {
                            break;
                        }
                        best = best.max(chunk_max(&buf[..n]));
                        left -= n;
                    }
                    if left == 0 {
                        return Some(best);
                    }
                }
            }
        }
        Some(chunk_max(&self.bytes.get()[self.offset..self.offset + self.count * self.width]))
    }
}

/// Whether a headerless file's first 4 KiB read as text: all printable ASCII or common
/// whitespace (a uint16 token stream of a large vocabulary almost never does).
fn looks_like_text(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(4096)];
    head.len() >= 64 && head.iter().all(|&b| b == b'\n' || b == b'\t' || b == b'\r' || (32..127).contains(&b))
}

/// Writes tokens in llm.c's format (version 1, uint16), atomically (temp file + rename).
pub fn write_llmc(path: &Path, tokens: &[u16]) -> std::io::Result<()> {
    let mut header = [0i32; 256];
    header[0] = LLMC_MAGIC;
    header[1] = 1;
    header[2] = i32::try_from(tokens.len())
        .map_err(|_| std::io::Error::other("more than 2^31 tokens do not fit llm.c's header"))?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * 2);
    header.iter().for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
    tokens.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The byte-level tokenizer: every byte of the text is one token (vocabulary 256).
pub fn byte_tokens(text: &[u8]) -> Vec<u16> {
    text.iter().map(|&b| b as u16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llmc_round_trip_and_batch_order() {
        let dir = std::env::temp_dir().join(format!("shardc-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        let tokens: Vec<u16> = (0..21).collect();
        write_llmc(&path, &tokens).unwrap();
        let f = TokenFile::open(&path).unwrap();
        assert_eq!(f.format, "llm.c v1");
        assert_eq!(f.len(), 21);
        // B = 2, T = 5: batch 1 rows start at 10 and 15.
        let (x, y) = f.batch(1, 2, 5).unwrap();
        assert_eq!(x, vec![10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(y, vec![11, 12, 13, 14, 15, 16, 17, 18, 19, 20]);
        assert_eq!(f.num_batches(2, 5), 2);
        assert!(f.batch(2, 2, 5).unwrap_err().to_string().contains("needs 31 tokens"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Several files (llm.c's shards) read as one: batches go file after file and never cross
    /// from one file into the next; random windows neither; a glob pattern opens them in name
    /// order.
    #[test]
    fn shards_read_as_one_sequence_without_crossing_files() {
        let dir = std::env::temp_dir().join(format!("shardc-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a: Vec<u16> = (0..21).collect();
        let b: Vec<u16> = (100..111).collect();
        write_llmc(&dir.join("train_000.bin"), &a).unwrap();
        write_llmc(&dir.join("train_001.bin"), &b).unwrap();
        let f = TokenFile::open(&dir.join("train_*.bin")).unwrap();
        assert_eq!((f.len(), f.format.as_str()), (32, "llm.c v1, 2 files"));
        // B = 2, T = 5: 2 batches in the first file (20 of its 21 tokens), 1 in the second.
        assert_eq!(f.num_batches(2, 5), 3);
        let (x, y) = f.batch(2, 2, 5).unwrap();
        assert_eq!(x, (100..110).collect::<Vec<i64>>());
        assert_eq!(y, (101..111).collect::<Vec<i64>>());
        assert!(f.batch(3, 2, 5).is_err());
        for r in 0..1000u64 {
            let s = f.random_start(r.wrapping_mul(0x9E37_79B9_7F4A_7C15), 5);
            let window: Vec<i64> = f.window(s, 6).collect();
            assert!(window.iter().all(|&t| t < 100) || window.iter().all(|&t| t >= 100), "{window:?} crosses files");
        }
        assert_eq!(f.max_token(), Some(110));
        let e = TokenFile::open(&dir.join("valid_*.bin")).unwrap_err();
        assert!(e.to_string().contains("no file matches"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raw_and_broken_files() {
        let f = TokenFile::from_bytes(Path::new("raw.bin"), &[1, 0, 2, 0]).unwrap();
        assert_eq!((f.format.as_str(), f.window(0, 2).collect::<Vec<_>>()), ("raw uint16", vec![1, 2]));
        let text = b"To be, or not to be, that is the question: whether 'tis nobler in the mind\n".repeat(2);
        let e = TokenFile::from_bytes(Path::new("hamlet.txt"), &text).unwrap_err();
        assert!(e.to_string().contains("looks like text") && e.to_string().contains("data prepare"), "{e}");
        assert!(TokenFile::from_bytes(Path::new("odd.bin"), &[1, 0, 2]).is_err());
        let mut bytes = vec![0u8; HEADER_BYTES];
        bytes[..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
        bytes[8..12].copy_from_slice(&10i32.to_le_bytes());
        let e = TokenFile::from_bytes(Path::new("short.bin"), &bytes).unwrap_err();
        assert!(e.to_string().contains("header says 10 tokens"), "{e}");
    }
}
