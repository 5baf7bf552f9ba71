//! Graceful shutdown: on SIGTERM or SIGINT (or a failed start) the listener stops accepting
//! and new requests answer 503; running and queued jobs may finish until the deadline, then
//! every job is cancelled at its next step and the process exits 0.

use super::http::App;
use crate::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// What ends the server: a signal, or a request from inside (a start-up that failed).
pub struct Stop {
    term: Signal,
    int: Signal,
    inner: watch::Receiver<bool>,
}

impl Stop {
    /// Installs the signal handlers now, so that a signal right after start is not lost;
    /// the sender stops the server from inside.
    pub fn install() -> Result<(Stop, watch::Sender<bool>)> {
        let install =
            |kind| signal(kind).map_err(|e| Error::InvalidArgument(format!("signal handler: {e}")));
        let (tx, inner) = watch::channel(false);
        let stop = Stop {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            inner,
        };
        Ok((stop, tx))
    }

    /// Resolves when the server should stop; then starts the deadline.
    pub async fn wait(self, app: Arc<App>, deadline: Duration) {
        let Stop {
            mut term,
            mut int,
            mut inner,
        } = self;
        {
            let term = std::pin::pin!(term.recv());
            let int = std::pin::pin!(int.recv());
            // A dropped sender (start-up done) never stops the server.
            let inner = std::pin::pin!(async {
                if inner.wait_for(|stop| *stop).await.is_err() {
                    futures_util::future::pending::<()>().await;
                }
            });
            let signals = futures_util::future::select(term, int);
            futures_util::future::select(signals, inner).await;
        }
        app.stopping.store(true, Ordering::SeqCst);
        if app.queue.running() + app.queue.depth() > 0 {
            eprintln!(
                "shutting down: accepting no more requests; running jobs have {:.0} s to finish",
                deadline.as_secs_f64()
            );
        }
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            if app.queue.running() + app.queue.depth() > 0 {
                eprintln!("shutdown deadline reached: cancelling the jobs still running");
            }
            app.queue.cancel.store(true, Ordering::SeqCst);
        });
    }
}
