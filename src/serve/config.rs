//! The server's settings (from `ultrapixel serve`'s options) and its bearer token.

use crate::{Error, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Jobs that may wait for a device; one more answers 429.
    pub max_queue: usize,
    pub token: Option<Token>,
    /// After SIGTERM: how long running and queued jobs may take before they are cancelled.
    pub shutdown_deadline: Duration,
}

/// The bearer token clients must send. Never printed: its `Debug` hides it.
pub struct Token(String);

impl Token {
    /// The token in `path` (surrounding whitespace removed).
    pub fn read(path: &Path) -> Result<Token> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let token = text.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::InvalidArgument(format!(
                "--token-file {}: expected one token (no spaces) on one line",
                path.display()
            )));
        }
        Ok(Token(token.to_string()))
    }

    /// Whether `given` is the token, in time independent of where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(hidden)")
    }
}
