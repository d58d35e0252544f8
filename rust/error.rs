//! The one error type of the Rust core.
//!
//! Every fallible function returns [`Result`]; the binding layer maps each variant to one Python
//! exception class of `momkd.errors` (see `py.rs`). Messages are single lines that name the store,
//! slide and chunk involved, so they can be shown to a user as they are.

/// An error of the Rust core. The payload is the complete, single-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bad, corrupt, incomplete or unsupported store (metadata, header, missing or undecodable chunk).
    #[error("{0}")]
    Store(String),
    /// A slide id or slide index that the store does not hold.
    #[error("{0}")]
    SlideNotFound(String),
    /// Invalid data: NaN/Inf, values out of range, bad shapes.
    #[error("{0}")]
    Data(String),
    /// Invalid argument or option value.
    #[error("{0}")]
    Config(String),
    /// Anything else (thread pool creation, a worker that vanished).
    #[error("{0}")]
    Internal(String),
}

/// Result alias of the Rust core.
pub type Result<T> = std::result::Result<T, Error>;

/// Collapse a message from another library onto one line.
pub fn one_line(text: impl std::fmt::Display) -> String {
    let s = text.to_string();
    let mut out = String::with_capacity(s.len());
    for part in s
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(part);
    }
    out
}

/// Run `f`, turning a panic into [`Error::Internal`] naming `context`, so that no panic can
/// unwind into Python.
pub fn catch_panics<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Internal(format!(
            "{context}: internal error: {}",
            one_line(what)
        )))
    })
}

impl Error {
    /// The message text.
    pub fn message(&self) -> &str {
        match self {
            Error::Store(m)
            | Error::SlideNotFound(m)
            | Error::Data(m)
            | Error::Config(m)
            | Error::Internal(m) => m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a\nb\r\n  c  \n"), "a: b: c");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn panics_become_errors() {
        let r: Result<()> = catch_panics("store x", || panic!("boom\nsecond line"));
        assert_eq!(
            r.unwrap_err(),
            Error::Internal("store x: internal error: boom: second line".into())
        );
        assert_eq!(catch_panics("c", || Ok(3)), Ok(3));
    }

    #[test]
    fn display_is_the_message() {
        let e = Error::Store("store x: bad".into());
        assert_eq!(e.to_string(), "store x: bad");
        assert_eq!(e.message(), "store x: bad");
    }
}
