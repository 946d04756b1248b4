//! Why a request failed: the engine's answer ([`Failure`], classed by [`ErrorCode`]) or the
//! connection's ([`ClientError`]).
use serde::{Deserialize, Serialize};

/// Error classes: stable strings in replies and distinct `omertactl` exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed.
    BadRequest,
    /// No VM of that name.
    NotFound,
    /// Understood but refused (bad endpoint, duplicate name, wrong state, not permitted).
    Refused,
    /// Too many clients at once.
    Busy,
    /// Something failed inside the engine.
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 5] =
        [ErrorCode::BadRequest, ErrorCode::NotFound, ErrorCode::Refused, ErrorCode::Busy, ErrorCode::Internal];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Refused => "refused",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// `omertactl`'s exit status for it.
    pub fn exit_status(self) -> u8 {
        match self {
            ErrorCode::BadRequest => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::Refused => 4,
            ErrorCode::Busy | ErrorCode::Internal => 1,
        }
    }
}

/// A failed request as the engine answers it: a class and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Class.
    pub code: ErrorCode,
    /// Message.
    pub message: String,
}

impl Failure {
    /// A failure.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// A request that could not be parsed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// Why a call did not succeed: the engine said no, or no answer came.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("the engine is not running (no answer at {path}: {source})")]
    NotRunning {
        /// The socket.
        path: String,
        /// What connecting said.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed midway.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The engine closed the connection without answering.
    #[error("the engine closed the connection without a reply")]
    Closed,
    /// The reply made no sense.
    #[error("{0}")]
    Protocol(String),
    /// The request cannot be sent as it is (a name with a space, a line too long): never sent.
    #[error("{0}")]
    Unsendable(Failure),
    /// The engine answered with a refusal.
    #[error("{0}")]
    Failed(#[from] Failure),
}

impl ClientError {
    /// The engine's refusal (or why the request could not be sent), if that is what this is.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            ClientError::Failed(f) | ClientError::Unsendable(f) => Some(f),
            _ => None,
        }
    }

    /// `omertactl`'s exit status for it: the code's for a refusal (bad usage for a request that
    /// cannot be sent), 5 when no engine runs, 1 for anything else.
    pub fn exit_status(&self) -> u8 {
        match self {
            ClientError::Failed(f) | ClientError::Unsendable(f) => f.code.exit_status(),
            ClientError::NotRunning { .. } => 5,
            _ => 1,
        }
    }
}
