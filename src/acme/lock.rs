//! A lease lock in storage, so instances sharing a volume place one order per name at a time.
//!
//! The lock is a file created with `O_CREAT|O_EXCL` holding its owner and an expiry time.
//! The holder pushes the expiry forward while it works; a lock whose expiry has passed
//! belongs to an instance that died, and is taken over. This works on any shared file
//! system that has atomic exclusive create and rename (local disks, Docker volumes, NFSv3+),
//! across containers and hosts, unlike `flock`. Clocks of instances sharing storage are
//! assumed to agree within the lease time.

use super::storage::{create_private_dir, unix};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a lease lasts without being renewed.
pub const LEASE: Duration = Duration::from_secs(120);
/// How often a holder renews it.
const RENEW_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Content {
    owner: String,
    /// Unix seconds.
    expires: i64,
}

/// A held lease; released (the file removed) on drop, or kept alive by [`Lease::keep_alive`].
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    owner: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

fn write_new(path: &Path, content: &Content) -> io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    let json = serde_json::to_vec(content).map_err(io::Error::other)?;
    f.write_all(&json)?;
    f.sync_all()
}

fn read(path: &Path) -> io::Result<Option<Content>> {
    let bytes = std::fs::read(path)?;
    Ok(serde_json::from_slice(&bytes).ok())
}

/// Tries to take the lease at `path` for `owner`. `Ok(None)`: another live owner holds it.
pub fn try_acquire(path: &Path, owner: &str, lease: Duration) -> io::Result<Option<Lease>> {
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    let content = || Content {
        owner: owner.to_owned(),
        expires: unix(SystemTime::now() + lease),
    };
    // Twice: once normally, once more after taking over a dead owner's lock.
    for _ in 0..2 {
        match write_new(path, &content()) {
            Ok(()) => {
                return Ok(Some(Lease {
                    path: path.to_owned(),
                    owner: owner.to_owned(),
                    renewer: None,
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let now = unix(SystemTime::now());
        let stale = match read(path) {
            Ok(Some(c)) => c.expires < now,
            // Unparsable: being written right now, or left half-written by a crash. Judge by
            // its age instead.
            Ok(None) => std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map(|t| unix(t) + lease.as_secs() as i64) // written at t
                .is_ok_and(|expires| expires < now),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !stale {
            return Ok(None);
        }
        // Take over by renaming it away: of several instances doing this at once only one
        // rename finds the file; the others see NotFound and try to create again.
        let aside = path.with_extension(format!("stale-{owner}"));
        match std::fs::rename(path, &aside) {
            Ok(()) => {
                tracing::warn!(lock = %path.display(), "took over an expired lock (its holder stopped)");
                let _ = std::fs::remove_file(&aside);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

impl Lease {
    /// Renews the lease in the background until it is dropped.
    pub fn keep_alive(&mut self) {
        let (path, owner) = (self.path.clone(), self.owner.clone());
        self.renewer = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let ours = matches!(read(&path), Ok(Some(c)) if c.owner == owner);
                if !ours {
                    tracing::warn!(lock = %path.display(), "lost the lock to another instance");
                    return;
                }
                let content = Content {
                    owner: owner.clone(),
                    expires: unix(SystemTime::now() + LEASE),
                };
                let written = serde_json::to_vec(&content)
                    .map_err(io::Error::other)
                    .and_then(|json| super::storage::write_file(&path, &json));
                if let Err(e) = written {
                    tracing::warn!(lock = %path.display(), error = %e, "cannot renew the lock");
                }
            }
        }));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        // Remove it only if it is still ours (not taken over after we stalled).
        if matches!(read(&self.path), Ok(Some(c)) if c.owner == self.owner) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A random identifier for this process's leases.
pub fn new_owner_id() -> String {
    format!("{}-{:016x}", std::process::id(), fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_release_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/order.lock");
        let a = try_acquire(&path, "a", LEASE).unwrap().expect("a gets it");
        assert!(try_acquire(&path, "b", LEASE).unwrap().is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        drop(a);
        assert!(!path.exists());
        assert!(try_acquire(&path, "b", LEASE).unwrap().is_some());
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.lock");
        let dead = Content {
            owner: "dead".into(),
            expires: unix(SystemTime::now()) - 10,
        };
        std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        let lease = try_acquire(&path, "b", LEASE).unwrap().expect("taken over");
        assert_eq!(read(&path).unwrap().unwrap().owner, "b");
        drop(lease);
        assert!(!path.exists());
    }

    #[test]
    fn a_lease_taken_over_is_not_removed_by_the_old_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.lock");
        let old = try_acquire(&path, "old", LEASE).unwrap().unwrap();
        // The old holder stalled past its lease and someone else took over.
        let other = Content {
            owner: "new".into(),
            expires: unix(SystemTime::now()) + 100,
        };
        std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        drop(old);
        assert_eq!(read(&path).unwrap().unwrap().owner, "new");
    }

    #[test]
    fn a_garbled_fresh_lock_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.lock");
        std::fs::write(&path, b"{\"own").unwrap();
        assert!(try_acquire(&path, "b", LEASE).unwrap().is_none());
        assert!(try_acquire(&path, "b", Duration::ZERO).is_ok());
    }
}
