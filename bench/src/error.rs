//! One error type for the generator's library code, so callers (and `main`) can tell a refused
//! connection from a protocol violation from a bad command line.

/// Everything that can go wrong while generating load.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A client connection failed: refused, closed, timed out, malformed (see
    /// [`corvid_testkit::ClientError`]).
    #[error(transparent)]
    Client(#[from] corvid_testkit::ClientError),
    /// The requested run makes no sense (for example p2p with unequal sides).
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Result alias used throughout the library.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
