//! A failed start, said plainly: what went wrong, in the words of what the gateway was
//! doing, and what to change. Never a backtrace: the operator reading it did nothing
//! wrong in the code, only in the configuration.

use std::io::ErrorKind;

use crate::store::StoreError;

/// What a failed start prints: the problem, and the fix when it is a known one.
#[derive(Debug, PartialEq, Eq)]
pub struct Explained {
    pub problem: String,
    pub fix: Option<String>,
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Serving is the one step after the start.
        let when = if self.problem.starts_with(SERVING) {
            "zapgate stopped"
        } else {
            "zapgate could not start"
        };
        write!(f, "{when}: {}", self.problem)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n  what to do: {fix}")?;
        }
        Ok(())
    }
}

/// The problem is every step of the error, outermost first ("binding 127.0.0.1:8080:
/// Address already in use"); the fix comes from its innermost cause.
pub fn explain(error: &anyhow::Error) -> Explained {
    let mut steps: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        // A cause that repeats its source's words adds nothing.
        if !steps.last().is_some_and(|last| last.ends_with(&text)) {
            steps.push(text);
        }
    }
    let area = area(&steps, error);
    let fix = error.chain().find_map(|cause| fix_for(cause, area));
    Explained {
        problem: steps.join(": "),
        fix,
    }
}

const DATA_DIR: &str = "--data-dir (ZAPGATE_DATA_DIR)";
const DATABASE_URL: &str = "--database-url (ZAPGATE_DATABASE_URL)";

/// The steps a start names in its errors (the context they are given), by which a
/// cause is told apart: a refused permission means one thing while binding, another
/// on the data directory.
pub const BINDING: &str = "binding";
pub const SETTINGS_FILE: &str = "reading the settings file";
pub const SERVING: &str = "serving HTTP";

/// What the start was at when it failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Area {
    Listening,
    SettingsFile,
    Database,
    /// The data directory and the files in it.
    Data,
}

fn area(steps: &[String], error: &anyhow::Error) -> Area {
    let first = steps.first().map(String::as_str).unwrap_or_default();
    if first.starts_with(BINDING) {
        Area::Listening
    } else if first.starts_with(SETTINGS_FILE) {
        Area::SettingsFile
    } else if error
        .chain()
        .any(|c| c.downcast_ref::<sqlx::Error>().is_some())
    {
        Area::Database
    } else {
        Area::Data
    }
}

fn fix_for(cause: &(dyn std::error::Error + 'static), area: Area) -> Option<String> {
    if let Some(e) = cause.downcast_ref::<std::io::Error>() {
        return io_fix(e.kind(), area);
    }
    if let Some(e) = cause.downcast_ref::<StoreError>() {
        return match e {
            StoreError::UnsupportedUrl(_) => Some(url_shape()),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
        return database_fix(e);
    }
    None
}

fn io_fix(kind: ErrorKind, area: Area) -> Option<String> {
    match area {
        Area::Listening => listen_fix(kind),
        Area::SettingsFile => settings_fix(kind),
        Area::Database => database_io_fix(kind),
        Area::Data => data_fix(kind),
    }
}

fn settings_fix(kind: ErrorKind) -> Option<String> {
    Some(match kind {
        ErrorKind::NotFound => {
            "check the path given to --config (ZAPGATE_CONFIG): no file is there".into()
        }
        ErrorKind::PermissionDenied => format!(
            "the settings file must be readable by the user the gateway runs as (uid {})",
            rustix::process::getuid().as_raw()
        ),
        _ => return None,
    })
}

fn database_io_fix(kind: ErrorKind) -> Option<String> {
    Some(match kind {
        ErrorKind::ConnectionRefused
        | ErrorKind::TimedOut
        | ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable
        | ErrorKind::AddrNotAvailable
        | ErrorKind::NotFound => format!(
            "nothing answered at the database's host and port: check that PostgreSQL \
             runs and that {DATABASE_URL} names its address"
        ),
        ErrorKind::PermissionDenied => format!(
            "this user may not open the database's socket: check its permissions, or \
             name a host and port in {DATABASE_URL}"
        ),
        _ => return None,
    })
}

fn listen_fix(kind: ErrorKind) -> Option<String> {
    Some(match kind {
        ErrorKind::AddrInUse => "another program (perhaps another zapgate) is listening on \
             that address: stop it, or give this gateway another port with --listen \
             (ZAPGATE_LISTEN), like --listen 127.0.0.1:8081"
            .into(),
        ErrorKind::AddrNotAvailable => "that address is not one of this machine's: listen \
             on 127.0.0.1:PORT for this machine only, or 0.0.0.0:PORT for every network"
            .into(),
        ErrorKind::PermissionDenied => "only a privileged process may listen on a port \
             below 1024: choose a port from 1024 up with --listen (ZAPGATE_LISTEN), and put \
             a reverse proxy in front for 80 or 443"
            .into(),
        _ => return None,
    })
}

fn data_fix(kind: ErrorKind) -> Option<String> {
    Some(match kind {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => format!(
            "the data directory must be writable by the user the gateway runs as (uid {}): \
             change its owner (chown -R) or its mode, or choose another one with {DATA_DIR}",
            rustix::process::getuid().as_raw()
        ),
        ErrorKind::NotADirectory | ErrorKind::AlreadyExists => format!(
            "a file stands where the data directory or one of its parents should be: move \
             it, or choose another directory with {DATA_DIR}"
        ),
        ErrorKind::StorageFull => format!(
            "the disk holding the data directory is full: free some room, or choose a \
             directory on another disk with {DATA_DIR}"
        ),
        _ => return None,
    })
}

fn database_fix(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => Some(format!(
                "PostgreSQL refused the user or password in {DATABASE_URL}: check both, \
                 and that pg_hba.conf lets this host in"
            )),
            Some("3D000") => Some(format!(
                "that database does not exist: create it (createdb -O <user> <name>), or \
                 name an existing one in {DATABASE_URL}"
            )),
            Some("42501") => Some(format!(
                "the database user may not create tables: make it the database's owner, \
                 or grant it CREATE on the schema, then start again ({DATABASE_URL})"
            )),
            _ => None,
        },
        sqlx::Error::Configuration(_) => Some(url_shape()),
        sqlx::Error::Io(io) => database_io_fix(io.kind()),
        sqlx::Error::PoolTimedOut => Some(format!(
            "the database did not answer in time: check that it runs and that \
             {DATABASE_URL} names its address"
        )),
        _ => None,
    }
}

fn url_shape() -> String {
    format!(
        "{DATABASE_URL} takes postgres://USER:PASSWORD@HOST:PORT/DATABASE or \
         sqlite:PATH; leave it unset for the SQLite file in the data directory"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn a_port_in_use_is_said_with_what_to_change() {
        let error = Err::<(), _>(std::io::Error::from(ErrorKind::AddrInUse))
            .context("binding 127.0.0.1:8080")
            .unwrap_err();
        let said = explain(&error);
        assert!(
            said.problem.starts_with("binding 127.0.0.1:8080: "),
            "{said:?}"
        );
        assert!(said.fix.unwrap().contains("--listen"));
    }

    #[test]
    fn a_refused_bind_and_an_unwritable_directory_get_their_own_fixes() {
        let refused = |doing: &'static str| {
            let error = Err::<(), _>(std::io::Error::from(ErrorKind::PermissionDenied))
                .context(doing)
                .unwrap_err();
            explain(&error).fix.unwrap()
        };
        assert!(refused("binding 0.0.0.0:80").contains("below 1024"));
        assert!(refused("creating the data directory /srv/zg").contains("--data-dir"));
        assert!(refused("reading the settings file /etc/zg.toml").contains("readable"));
    }

    #[test]
    fn an_unknown_cause_is_said_as_it_is() {
        let error = anyhow::anyhow!("something odd").context("loading instances");
        assert_eq!(
            explain(&error),
            Explained {
                problem: "loading instances: something odd".into(),
                fix: None
            }
        );
    }
}
