//! One gateway per data directory: an exclusive lock (`flock`) on `<data-dir>/zapgate.lock`,
//! held for the gateway's life and let go by the kernel whenever it ends, `kill -9`
//! included. Two gateways on one directory would log in the same devices and knock each
//! other off, and both deliver the outbox.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a start waits for the lock: a gateway still on its way out lets go within it.
const WAIT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock, or says which process holds it and what to do.
    pub(crate) async fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("zapgate.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + WAIT;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = match holder.trim() {
                        "" => "another process".to_owned(),
                        pid => format!("another zapgate (pid {pid})"),
                    };
                    bail!(
                        "{holder} is already using the data directory {}: stop it first, or give this gateway its own --data-dir (ZAPGATE_DATA_DIR)",
                        data_dir.display()
                    );
                }
                Err(e) => {
                    return Err(std::io::Error::from(e))
                        .with_context(|| format!("locking {}", path.display()));
                }
            }
        }
        // Ours now: say who holds it, for the next one that tries.
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_second_lock_on_one_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = super::DataDirLock::acquire(dir.path()).await.unwrap();
        let error = super::DataDirLock::acquire(dir.path())
            .await
            .unwrap_err()
            .to_string();
        let pid = std::process::id();
        assert!(
            error.starts_with(&format!(
                "another zapgate (pid {pid}) is already using the data directory"
            )),
            "{error}"
        );
        drop(held);
        assert!(super::DataDirLock::acquire(dir.path()).await.is_ok());
    }
}
