//! An in-process network for scenario tests: several nodes in one process, their
//! node-to-node calls handed straight to the peer's server half
//! ([`crate::internal::route`]) instead of a socket, and single links that can be cut
//! and healed while the test runs. A partition (including a link cut between two nodes
//! that both still reach a third, or a cut in one direction only) becomes a line of
//! test data instead of iptables rules, and runs at unit-test speed.
//!
//! Only the node-to-node traffic goes through it: each node still serves its client
//! API (and its internal routes) on a real port, so a test reads and writes as a
//! client does, whatever links are cut.
//!
//! Links are cut per message, in one direction or both:
//! - `from → to` cut: the request never arrives; the caller sees a transport error.
//! - `to → from` cut (the way back): the request arrives and is acted on, the answer is
//!   lost; the caller sees [`PeerError::Timeout`].
//!
//! What differs from sockets, on purpose: a cut fails at once, where a dropped packet
//! costs the caller its timeout (2 s to connect, up to 30 s on a pooled connection),
//! so scenarios show what converges, not how long it takes; and a one-way cut loses
//! messages in one direction only, where a real one-way packet loss also breaks new
//! TCP handshakes both ways (only requests on connections opened before the cut have
//! their answers lost). The request's handler runs on the caller's task, so a caller
//! that gives up cancels it, as hyper cancels a request whose connection closed. A
//! stopping node leaves the network when its stop signal fires, as its server stops
//! accepting. Request bodies take their share of the receiving node's body budget
//! from `Content-Length`, as on the wire; the budgets are per process, so nodes in one
//! test share them (they are large enough not to matter at test sizes).

use crate::api::ApiError;
use crate::node::{App, Embedding};
use crate::protocol::{BoxFuture, PeerError, PeerTransport, WIRE_HEADER, WIRE_VERSION};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The nodes attached to the network and the links that are cut.
#[derive(Default)]
pub struct LocalNet {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Advertised address → node. Weak: a stopped node is gone, as its port would be.
    nodes: HashMap<String, Weak<App>>,
    /// Directed links `(from, to)` whose packets are dropped.
    cut: HashSet<(String, String)>,
}

impl LocalNet {
    /// An empty network with every link up.
    pub fn new() -> Arc<LocalNet> {
        Arc::new(LocalNet::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a node needs to run on this network: its node-to-node calls go through it,
    /// and it is attached once it serves. It stops when `stop` resolves.
    pub fn embedding(
        self: &Arc<Self>,
        stop: BoxFuture<'static, ()>,
        on_serving: impl FnOnce(Arc<App>) + Send + 'static,
    ) -> Embedding {
        let (for_transport, for_attach, for_stop) = (self.clone(), self.clone(), self.clone());
        let attached: Arc<Mutex<Option<String>>> = Arc::default();
        let attached_at_stop = attached.clone();
        Embedding {
            reload: None,
            transport: Some(Box::new(move |me: &str| {
                Arc::new(Link { net: for_transport, from: me.to_string() }) as Arc<dyn PeerTransport>
            })),
            on_serving: Some(Box::new(move |app: Arc<App>| {
                let address = app.cluster.me().address;
                for_attach.state().nodes.insert(address.clone(), Arc::downgrade(&app));
                *attached.lock().unwrap_or_else(|p| p.into_inner()) = Some(address);
                on_serving(app);
            })),
            stop: Some(Box::pin(async move {
                stop.await;
                // The server stops accepting first (node.rs's stop order): so does the network.
                if let Some(address) = attached_at_stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    for_stop.state().nodes.remove(&address);
                }
            })),
        }
    }

    /// Cuts the link between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Cuts the link from `from` to `to` only: `to` still reaches `from`, but never
    /// hears the answers.
    pub fn cut_one_way(&self, from: &str, to: &str) {
        self.state().cut.insert((from.to_string(), to.to_string()));
    }

    /// Heals the link between `a` and `b`, both ways.
    pub fn heal(&self, a: &str, b: &str) {
        let mut s = self.state();
        s.cut.remove(&(a.to_string(), b.to_string()));
        s.cut.remove(&(b.to_string(), a.to_string()));
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        self.state().cut.clear();
    }

    fn is_cut(&self, from: &str, to: &str) -> bool {
        self.state().cut.contains(&(from.to_string(), to.to_string()))
    }
}

/// One node's end of the network.
struct Link {
    net: Arc<LocalNet>,
    from: String,
}

impl PeerTransport for Link {
    fn send(&self, req: Request<Bytes>) -> BoxFuture<'_, Result<Response<Bytes>, PeerError>> {
        Box::pin(async move {
            let to = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
            if self.net.is_cut(&self.from, &to) {
                return Err(PeerError::Transport(format!("link {} -> {to} is cut", self.from)));
            }
            let app = self.net.state().nodes.get(&to).and_then(Weak::upgrade);
            let Some(app) = app else {
                return Err(PeerError::Transport(format!("nothing serves {to}")));
            };
            let mut resp =
                crate::internal::route(&app, req.map(Full::new)).await.unwrap_or_else(ApiError::into_response);
            drop(app);
            resp.headers_mut().insert(WIRE_HEADER, HeaderValue::from(WIRE_VERSION));
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let answer = Response::from_parts(parts, body);
            if self.net.is_cut(&to, &self.from) {
                return Err(PeerError::Timeout);
            }
            Ok(answer)
        })
    }
}
