//! Sessions kept between runs of the same graph, so a server answering requests of one size
//! places each step graph once: its arena, its launch list and (on CUDA) its captured graph
//! are reused by the next request instead of being rebuilt. A session is found by its
//! graph's [`Graph::fingerprint`]; the weights it reads are the ones it was placed with, so
//! whoever owns a cache clears it when the weights change.

use super::graph::{Graph, TensorId};
use super::session::Session;
use crate::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A session that may move between threads (the cache belongs to a pipeline that several
/// threads share, one generation at a time).
pub type SendSession = Box<dyn Session + Send>;

/// Idle sessions by graph fingerprint, and what the cache did.
#[derive(Default)]
pub struct SessionCache {
    idle: Mutex<Idle>,
    hits: AtomicUsize,
    misses: AtomicUsize,
}

#[derive(Default)]
struct Idle {
    /// What the sessions were placed for (the owner's key, e.g. an output size).
    tag: Option<String>,
    /// Bumped whenever the idle sessions are dropped: a session leased before comes back
    /// to nothing and is dropped too.
    epoch: u64,
    sessions: HashMap<[u8; 32], Vec<SendSession>>,
}

impl SessionCache {
    pub fn new() -> Arc<SessionCache> {
        Arc::new(SessionCache::default())
    }

    /// Makes `tag` the cache's; a different tag drops every idle session first. Returns
    /// whether the tag was already the cache's.
    pub fn retag(&self, tag: &str) -> bool {
        let mut idle = self.idle.lock().expect("session cache lock");
        if idle.tag.as_deref() == Some(tag) {
            return true;
        }
        idle.drop_all();
        idle.tag = Some(tag.to_string());
        false
    }

    /// Drops every idle session (and forgets the tag).
    pub fn clear(&self) {
        let mut idle = self.idle.lock().expect("session cache lock");
        idle.drop_all();
        idle.tag = None;
    }

    /// The session for `graph`: an idle one placed for the same graph, or a new one from
    /// `place`. It comes back to the cache when dropped.
    pub fn lease(
        self: &Arc<Self>,
        graph: Graph,
        place: impl FnOnce(Graph) -> Result<SendSession>,
    ) -> Result<Leased> {
        let key = graph.fingerprint();
        let (idle, epoch) = {
            let mut idle = self.idle.lock().expect("session cache lock");
            let found = idle.sessions.get_mut(&key).and_then(Vec::pop);
            (found, idle.epoch)
        };
        let session = match idle {
            Some(s) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                s
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                place(graph)?
            }
        };
        Ok(Leased {
            session: Some(session),
            key,
            epoch,
            home: self.clone(),
        })
    }

    /// (sessions reused, sessions placed) so far.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Activation bytes the idle sessions hold.
    pub fn arena_bytes(&self) -> usize {
        let idle = self.idle.lock().expect("session cache lock");
        idle.sessions
            .values()
            .flatten()
            .map(|s| s.arena_bytes())
            .sum()
    }

    fn give_back(&self, key: [u8; 32], epoch: u64, session: SendSession) {
        let mut idle = self.idle.lock().expect("session cache lock");
        if idle.epoch == epoch {
            idle.sessions.entry(key).or_default().push(session);
        }
    }
}

impl Idle {
    fn drop_all(&mut self) {
        self.sessions.clear();
        self.epoch += 1;
    }
}

/// A session on lease from a [`SessionCache`]; it goes back when dropped.
pub struct Leased {
    session: Option<SendSession>,
    key: [u8; 32],
    epoch: u64,
    home: Arc<SessionCache>,
}

impl Leased {
    fn inner(&self) -> &SendSession {
        self.session
            .as_ref()
            .expect("a leased session until dropped")
    }

    fn inner_mut(&mut self) -> &mut SendSession {
        self.session
            .as_mut()
            .expect("a leased session until dropped")
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.home.give_back(self.key, self.epoch, s);
        }
    }
}

impl Session for Leased {
    fn graph(&self) -> &Graph {
        self.inner().graph()
    }

    fn set_input(&mut self, id: TensorId, data: &[f32]) -> Result<()> {
        self.inner_mut().set_input(id, data)
    }

    fn run(&mut self) -> Result<()> {
        self.inner_mut().run()
    }

    fn read(&mut self, id: TensorId) -> Result<Vec<f32>> {
        self.inner_mut().read(id)
    }

    fn arena_bytes(&self) -> usize {
        self.inner().arena_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::{Act, Activation};
    use crate::runtime::Backend;
    use crate::tensor::DType;
    use std::collections::HashMap;

    fn graph(act: Act, len: usize) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", &[len], DType::F32).unwrap();
        let y = g
            .op1(
                Activation {
                    act,
                    out: DType::F32,
                },
                &[x],
            )
            .unwrap();
        g.output(y, "y").unwrap();
        g
    }

    fn place(g: Graph) -> Result<SendSession> {
        Backend::Cpu.session(g, &HashMap::new(), Default::default())
    }

    #[test]
    fn fingerprints_tell_graphs_apart_by_op_parameters_and_shapes() {
        let a = graph(Act::Gelu, 37);
        assert_eq!(a.fingerprint(), graph(Act::Gelu, 37).fingerprint());
        assert_ne!(a.fingerprint(), graph(Act::Silu, 37).fingerprint());
        assert_ne!(a.fingerprint(), graph(Act::Gelu, 38).fingerprint());
    }

    #[test]
    fn a_session_comes_back_for_the_same_graph_until_the_cache_is_dropped() {
        let cache = SessionCache::new();
        assert!(!cache.retag("512x512"));
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 4.0).collect();
        let run = |s: &mut Leased| {
            let id = s.graph().find("x").unwrap();
            s.set_input(id, &x).unwrap();
            s.run().unwrap();
            let y = s.graph().outputs[0];
            s.read(y).unwrap()
        };
        let want = run(&mut cache.lease(graph(Act::Gelu, 37), place).unwrap());
        assert_eq!(cache.counts(), (0, 1));
        // The same graph, built again: the idle session, with the same results.
        let mut again = cache.lease(graph(Act::Gelu, 37), place).unwrap();
        assert_eq!(cache.counts(), (1, 1));
        // While it is out, a second lease of that graph places another.
        drop(cache.lease(graph(Act::Gelu, 37), place).unwrap());
        assert_eq!(cache.counts(), (1, 2));
        assert_eq!(run(&mut again), want);
        drop(again);
        // Another graph never gets it.
        drop(cache.lease(graph(Act::Silu, 37), place).unwrap());
        assert_eq!(cache.counts(), (1, 3));
        // The same tag keeps the idle sessions; another drops them, and a session out on
        // lease then is dropped when it comes back.
        assert!(cache.retag("512x512"));
        let out = cache.lease(graph(Act::Gelu, 37), place).unwrap();
        assert_eq!(cache.counts(), (2, 3));
        assert!(!cache.retag("512x576"));
        drop(out);
        drop(cache.lease(graph(Act::Gelu, 37), place).unwrap());
        assert_eq!(cache.counts(), (2, 4));
        cache.clear();
        drop(cache.lease(graph(Act::Gelu, 37), place).unwrap());
        assert_eq!(cache.counts(), (2, 5));
    }
}
