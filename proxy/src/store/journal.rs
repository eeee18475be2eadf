//! The write journal: where the storage worker puts writes while another connection holds
//! the store's write lock, so that a tunnel's 200 need not wait for the lock.
//!
//! A batch the worker cannot commit because the store is busy is appended to
//! `<store>.gatehouse-journal` (one JSON line per write) and acknowledged: written to the
//! operating system, it survives a crash of the gateway exactly as a committed SQLite WAL
//! frame with `synchronous=NORMAL` does. While the journal is not empty every later write is
//! appended to it too, before its commit is tried, so the journal is always a complete log
//! since it began; it is emptied right after a commit that included all of it. At start
//! (`Store::snapshot`) a journal left behind is applied in order (the writes are idempotent:
//! replacing and deleting rows by key) and emptied, so replaying it twice changes nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::{SqliteStore, StoreError, StoreWrite};

/// The journal file next to a store file.
pub fn path_for(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".gatehouse-journal");
    PathBuf::from(name)
}

/// An open journal (the storage worker's).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Option<File>,
    /// Writes appended since the journal was last emptied.
    entries: usize,
}

impl Journal {
    pub fn new(path: PathBuf) -> Journal {
        Journal {
            path,
            file: None,
            entries: 0,
        }
    }

    /// Writes appended and not yet known to be committed.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Appends writes, one line each, in one `write` call.
    pub fn append(&mut self, writes: &[StoreWrite]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(writes.len() * 256);
        for w in writes {
            serde_json::to_writer(&mut buf, w).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            self.file = Some(f);
        }
        if let Some(f) = &mut self.file {
            f.write_all(&buf)?;
        }
        self.entries += writes.len();
        Ok(())
    }

    /// Everything appended is committed: empty the journal.
    pub fn clear(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.set_len(0)?;
        }
        self.entries = 0;
        Ok(())
    }
}

/// Applies a journal left by a previous run, in order and in one transaction, then empties
/// it. Returns the number of writes applied. A torn last line (the process died mid-append)
/// is skipped: its batch was never acknowledged.
pub fn replay(store: &mut SqliteStore, path: &Path) -> Result<usize, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::Invalid(format!("{}: {e}", path.display()))),
    };
    let mut writes = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
        match serde_json::from_str::<StoreWrite>(&line) {
            Ok(w) => writes.push(w),
            Err(e) => {
                tracing::warn!(line = n + 1, error = %e, "journal line skipped (torn write)");
            }
        }
    }
    match store.apply(&writes) {
        Ok(_) => {}
        // Locked past the busy timeout: keep the journal, refuse to start (said clearly).
        Err(e) if e.is_busy() => return Err(e),
        // One bad write must not keep the gateway from starting: the rest go one by one.
        Err(_) => {
            for w in &writes {
                match store.apply(std::slice::from_ref(w)) {
                    Ok(_) => {}
                    Err(e) if e.is_busy() => return Err(e),
                    Err(e) => {
                        tracing::error!(write = w.label(), error = %e, "journal write not applied")
                    }
                }
            }
        }
    }
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(writes.len())
}
