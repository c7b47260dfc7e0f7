//! Errors are values with stable codes; the Node layer maps each code to `HyperLoraError.code`.

use std::fmt;

/// Stable error codes. The string form (`BAD_WEIGHTS`, ...) is part of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadWeights,
    ModelNotFound,
    InvalidArgument,
    NoFace,
    OutOfMemory,
    Aborted,
    Io,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadWeights,
        ErrorCode::ModelNotFound,
        ErrorCode::InvalidArgument,
        ErrorCode::NoFace,
        ErrorCode::OutOfMemory,
        ErrorCode::Aborted,
        ErrorCode::Io,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadWeights => "BAD_WEIGHTS",
            ErrorCode::ModelNotFound => "MODEL_NOT_FOUND",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::NoFace => "NO_FACE",
            ErrorCode::OutOfMemory => "OUT_OF_MEMORY",
            ErrorCode::Aborted => "ABORTED",
            ErrorCode::Io => "IO",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// An engine error: a code plus a message that names the file, tensor or argument at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn bad_weights(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadWeights, message)
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ModelNotFound, message)
    }
    pub fn aborted() -> Self {
        Self::new(ErrorCode::Aborted, "the operation was aborted")
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// Prefixes the message with context (a file name, a tensor name, a stage).
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self {
            code: self.code,
            message: format!("{context}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // Candle reports missing tensors and shape mismatches while loading weights; anything
        // else is a bug on our side or an exhausted device.
        let text = e.to_string();
        let code = if text.contains("out of memory") || text.contains("OUT_OF_MEMORY") {
            ErrorCode::OutOfMemory
        } else if let Some(code) = source_code(&e) {
            code
        } else if text.contains("cannot find tensor") || text.contains("shape mismatch") {
            ErrorCode::BadWeights
        } else {
            ErrorCode::Internal
        };
        Self::new(code, text)
    }
}

/// The code of a candle error that comes from reading a file: a malformed safetensors file or a
/// dtype candle cannot load is `BAD_WEIGHTS`, an I/O failure as [`From<std::io::Error>`] says.
/// Looks through candle's context, path and backtrace wrappers.
fn source_code(e: &candle_core::Error) -> Option<ErrorCode> {
    use candle_core::Error as E;
    match e {
        E::SafeTensor(_) | E::UnsupportedSafeTensorDtype(_) => Some(ErrorCode::BadWeights),
        E::Io(io) => Some(Error::from(std::io::Error::from(io.kind())).code),
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            source_code(inner)
        }
        _ => None,
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorCode::ModelNotFound,
            // Reading a model file as text found bytes that are not UTF-8: a bad file, not a
            // failing disk.
            std::io::ErrorKind::InvalidData => ErrorCode::BadWeights,
            _ => ErrorCode::Io,
        };
        Self::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to any result whose error converts into [`Error`].
pub trait ResultExt<T> {
    fn context(self, context: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_file_errors_keep_their_codes_through_wrappers() {
        let bad = candle_core::Error::from(safetensors::SafeTensorError::InvalidOffset("w".into()))
            .with_path("model.safetensors")
            .context("unet weights");
        let e = Error::from(bad);
        assert_eq!(e.code, ErrorCode::BadWeights, "{e}");
        assert!(e.message.contains("model.safetensors"), "{e}");
        let missing = candle_core::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound))
            .with_path("shard.safetensors");
        assert_eq!(Error::from(missing).code, ErrorCode::ModelNotFound);
        let other = candle_core::Error::Msg("a bug".into());
        assert_eq!(Error::from(other).code, ErrorCode::Internal);
        let not_utf8 = std::io::Error::from(std::io::ErrorKind::InvalidData);
        assert_eq!(Error::from(not_utf8).code, ErrorCode::BadWeights);
    }
}
