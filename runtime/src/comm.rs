//! The in-process communicator: ranks are threads of this process, collectives meet at an
//! abortable barrier and read each other's contributions.
//!
//! A collective is an [`InProcess::exchange`]: every rank of the world posts its bytes, all
//! wait, each reads what it needs from its group's posts, all wait again (so a post is not
//! overwritten while a peer still reads it). Every rank calls the collectives of the program
//! in the same order (SPMD), so the world-wide barrier is the collective's rendezvous; a rank
//! that fails aborts the barrier and the others return [`CommError::PeerFailed`] instead of
//! waiting forever.

use std::sync::{Condvar, Mutex, RwLock};

/// Why a collective did not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    #[error("rank {0} failed, so this collective cannot complete")]
    PeerFailed(usize),
}

struct BarrierState {
    waiting: usize,
    generation: u64,
    failed: Option<usize>,
}

/// Ranks as threads: posts per rank and a barrier that a failing rank can abort.
pub struct InProcess {
    world: usize,
    state: Mutex<BarrierState>,
    wake: Condvar,
    /// Per rank: its post, in 8-byte words (so that a post's f32 or f64 view is aligned), and
    /// its length in bytes.
    posts: Vec<RwLock<(Vec<u64>, usize)>>,
}

fn post_bytes(p: &(Vec<u64>, usize)) -> &[u8] {
    // SAFETY: the words are plain bytes; `p.1` <= 8 * p.0.len() (set in `post`).
    unsafe { std::slice::from_raw_parts(p.0.as_ptr() as *const u8, p.1) }
}

impl InProcess {
    pub fn new(world: usize) -> Self {
        InProcess {
            world,
            state: Mutex::new(BarrierState { waiting: 0, generation: 0, failed: None }),
            wake: Condvar::new(),
            posts: (0..world).map(|_| RwLock::new((Vec::new(), 0))).collect(),
        }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Waits until every rank arrives, or a rank fails.
    fn barrier(&self) -> Result<(), CommError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = s.failed {
            return Err(CommError::PeerFailed(r));
        }
        s.waiting += 1;
        if s.waiting == self.world {
            s.waiting = 0;
            s.generation += 1;
            self.wake.notify_all();
            return Ok(());
        }
        let generation = s.generation;
        while s.generation == generation && s.failed.is_none() {
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match s.failed {
            Some(r) if s.generation == generation => Err(CommError::PeerFailed(r)),
            _ => Ok(()),
        }
    }

    /// Rank `rank` failed: every rank waiting now or later gets [`CommError::PeerFailed`].
    pub fn abort(&self, rank: usize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failed.get_or_insert(rank);
        self.wake.notify_all();
    }

    /// One collective step: posts `mine`, then calls `read` with every rank's post (indexed by
    /// rank), then waits until every rank has read.
    pub fn exchange<R>(&self, rank: usize, mine: &[u8], read: impl FnOnce(&[&[u8]]) -> R) -> Result<R, CommError> {
        self.post(rank, mine);
        self.exchange_posted(read)
    }

    /// The first half of [`InProcess::exchange`]: rank `rank`'s contribution to the next
    /// collective (so that the caller need not hold its source while it reads the others').
    pub fn post(&self, rank: usize, mine: &[u8]) {
        let mut post = self.posts[rank].write().unwrap_or_else(|p| p.into_inner());
        let (words, len) = &mut *post;
        words.resize(mine.len().div_ceil(8), 0);
        // SAFETY: `words` holds at least `mine.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(mine.as_ptr(), words.as_mut_ptr() as *mut u8, mine.len()) };
        *len = mine.len();
    }

    /// The rest of [`InProcess::exchange`], after [`InProcess::post`].
    pub fn exchange_posted<R>(&self, read: impl FnOnce(&[&[u8]]) -> R) -> Result<R, CommError> {
        self.barrier()?;
        let result = {
            let guards: Vec<_> = self.posts.iter().map(|p| p.read().unwrap_or_else(|p| p.into_inner())).collect();
            let views: Vec<&[u8]> = guards.iter().map(|g| post_bytes(g)).collect();
            read(&views)
        };
        self.barrier()?;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_reads_every_post() {
        let comm = InProcess::new(3);
        let sums: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let comm = &comm;
                    s.spawn(move || {
                        comm.exchange(r, &[r as u8 + 1], |all| all.iter().map(|p| p[0] as u32).sum()).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sums, vec![6, 6, 6]);
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let comm = InProcess::new(2);
        let r = std::thread::scope(|s| {
            let h = s.spawn(|| comm.exchange(0, &[1], |_| ()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            comm.abort(1);
            h.join().unwrap()
        });
        assert_eq!(r, Err(CommError::PeerFailed(1)));
    }
}
