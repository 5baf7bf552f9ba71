//! The boundary every entry point goes through: an error or a panic becomes a status code and
//! the calling thread's last error message; nothing unwinds into C.

use crate::UpxStatus;
use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use upx::{Error, Result};

// A panic must be caught, not abort the C program: the build must unwind.
#[cfg(panic = "abort")]
compile_error!("the C ABI needs panic = \"unwind\" to keep panics from crossing into C");

thread_local! {
    /// The message of the last failed call on this thread (None after a call that succeeded).
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Runs the body of an entry point: clears the thread's last error, then turns an error into
/// its status (the CLI's exit code class) and a panic into [`UpxStatus::Internal`], keeping
/// the message for `upx_last_error`.
pub(crate) fn run<T>(body: impl FnOnce() -> Result<T>) -> Result<T, UpxStatus> {
    set_last_error(None);
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => (status_of(&e), e.to_string()),
        Err(payload) => (
            UpxStatus::Internal,
            format!(
                "internal error (a bug in ultrapixel; please report it): {}",
                panic_message(payload.as_ref())
            ),
        ),
    };
    set_last_error(Some(message));
    Err(status)
}

/// The status of an error: the class of the CLI's exit code for it.
fn status_of(e: &Error) -> UpxStatus {
    match upx::cli::exit_code(e) {
        130 => UpxStatus::Cancelled,
        2 => UpxStatus::InvalidInput,
        _ => UpxStatus::Failed,
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

fn set_last_error(message: Option<String>) {
    // A C string ends at its first NUL: keep the rest of the message readable.
    let message = message.map(|m| CString::new(m.replace('\0', "\\0")).expect("no NUL left"));
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// The last error of this thread, or "" when its last call succeeded; the pointer stays valid
/// until the thread's next call that clears or sets it.
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|e| match &*e.borrow() {
        Some(m) => m.as_ptr(),
        None => c"".as_ptr(),
    })
}

/// A required C string argument as UTF-8.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that outlives the call.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(null_arg(name));
    }
    CStr::from_ptr(ptr)
        .to_str()
        .map_err(|e| Error::InvalidArgument(format!("{name} is not valid UTF-8: {e}")))
}

pub(crate) fn null_arg(name: &str) -> Error {
    Error::InvalidArgument(format!("{name} is NULL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        unsafe { CStr::from_ptr(last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_panic_becomes_the_internal_status_and_its_message() {
        let got: Result<u32, _> = run(|| panic!("deliberate panic {}", 42));
        assert_eq!(got, Err(UpxStatus::Internal));
        let msg = last();
        assert!(
            msg.contains("internal error") && msg.contains("deliberate panic 42"),
            "{msg}"
        );
        // A panic with a non-string payload is caught too.
        let got: Result<u32, _> = run(|| std::panic::panic_any(7u8));
        assert_eq!(got, Err(UpxStatus::Internal));
        assert!(last().contains("without a message"), "{}", last());
    }

    #[test]
    fn errors_map_to_the_exit_code_classes_and_success_clears_the_message() {
        let cases = [
            (Error::Interrupted, UpxStatus::Cancelled),
            (
                Error::InvalidArgument("bad".into()),
                UpxStatus::InvalidInput,
            ),
            (Error::cuda("launch", "failed"), UpxStatus::Failed),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert_eq!(run(|| -> Result<()> { Err(e) }), Err(want));
            assert_eq!(last(), text);
        }
        assert_eq!(run(|| Ok(5)), Ok(5));
        assert_eq!(last(), "");
    }

    #[test]
    fn the_last_error_belongs_to_its_thread() {
        let _ = run(|| -> Result<()> { Err(Error::InvalidArgument("here".into())) });
        std::thread::spawn(|| assert_eq!(last(), ""))
            .join()
            .unwrap();
        assert_eq!(last(), "here");
    }

    #[test]
    fn null_and_non_utf8_strings_are_errors() {
        let err = unsafe { str_arg(std::ptr::null(), "prompt") }.unwrap_err();
        assert_eq!(err.to_string(), "prompt is NULL");
        let bad = CString::new(vec![b'a', 0xff, b'b']).unwrap();
        let err = unsafe { str_arg(bad.as_ptr(), "prompt") }.unwrap_err();
        assert!(err.to_string().contains("not valid UTF-8"), "{err}");
        let ok = CString::new("a cat").unwrap();
        assert_eq!(unsafe { str_arg(ok.as_ptr(), "prompt") }.unwrap(), "a cat");
    }

    #[test]
    fn a_message_with_nul_stays_whole() {
        let _ = run(|| -> Result<()> { Err(Error::InvalidArgument("a\0b".into())) });
        assert_eq!(last(), "a\\0b");
    }
}
