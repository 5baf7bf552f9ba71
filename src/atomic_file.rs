//! Files that appear whole or not at all: written to a temporary file in the target's
//! directory, flushed to disk, then renamed over the target. On any error the temporary file
//! is removed and an existing target is left untouched.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `path` through `write`, atomically. `write` gets a buffered writer; its error (or
/// any I/O error on the way) aborts the write.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let (temp_path, file) = create_temp_beside(path)?;
    let temp = TempFile(temp_path);
    let mut out = BufWriter::new(file);
    write(&mut out)?;
    let file = out
        .into_inner()
        .map_err(|e| Error::io(&temp.0, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&temp.0, e))?;
    drop(file);
    std::fs::rename(&temp.0, path).map_err(|e| Error::io(path, e))?;
    sync_parent(path);
    Ok(())
}

/// Removes its file when dropped; after a successful rename the removal fails harmlessly.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates a fresh hidden file next to `path` (same directory, so the rename stays on one
/// file system); unique per process and call, so concurrent writers never share it.
fn create_temp_beside(path: &Path) -> Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a file name", path.display())))?
        .to_string_lossy();
    let temp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| Error::io(&temp, e))?;
    Ok((temp, file))
}

/// Makes the rename itself durable; best effort (not every file system allows it).
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_complete_write_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, b"old").unwrap();
        write_atomic(&path, |w| {
            w.write_all(b"new").map_err(|e| Error::io("f", e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()), [path]);
    }

    /// A writer that fails after some bytes, as a full disk does.
    struct FullDisk(usize);

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial").map_err(|e| Error::io("f", e))?;
            let mut disk = FullDisk(3);
            disk.write_all(&[0; 16]).map_err(|e| Error::io(&path, e))
        })
        .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), std::slice::from_ref(&path));
        // A missing directory is an error naming it.
        let err = write_atomic(&dir.path().join("no/such/f.txt"), |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("no/such"), "{err}");
    }
}
