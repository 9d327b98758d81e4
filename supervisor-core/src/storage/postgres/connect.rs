//! How the backend reaches its database: the configured URL with this server's defaults for
//! what it leaves out, the form of it that may be shown (never the password), and what a
//! driver error means for the caller.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{Config, Host, SslMode};
use tokio_postgres::error::Severity;

use crate::storage::StorageError;

/// The server cancels any statement of ours running longer than this, so a stuck query (a lock
/// held elsewhere, a huge scan) fails instead of holding a connection forever.
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Our own bound on any one exchange with the server, a little above the statement timeout: it
/// also covers a server that stopped answering without closing the connection.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(35);

/// What a statement that outlived [`ANSWER_TIMEOUT`] fails with.
pub(super) fn no_answer() -> StorageError {
    StorageError::Unavailable(format!(
        "the database did not answer within {} s",
        ANSWER_TIMEOUT.as_secs()
    ))
}
/// How long opening a connection may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Unacknowledged data older than this breaks a TCP connection (unless the URL says
/// `tcp_user_timeout`), so a vanished server is noticed within the statement timeout.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses the URL (or `key=value` connection string) and fills in what it leaves out: a
/// connect timeout, a TCP timeout, the statement timeout and an application name. Options the
/// URL gives (`options=-c ...`) come after ours, so they win.
///
/// # Errors
/// The URL does not parse, or asks for TLS, which this build does not carry.
pub(super) fn settings(url: &str) -> Result<Config, StorageError> {
    let mut config = Config::from_str(url).map_err(|e| {
        StorageError::Postgres(format!(
            "server.storage.url is not a PostgreSQL URL: {}",
            describe(&e)
        ))
    })?;
    if config.get_ssl_mode() == SslMode::Require {
        return Err(StorageError::Postgres(
            "server.storage.url asks for TLS (sslmode=require), which this server does not \
             support yet: reach the database over a private network or a Unix socket"
                .into(),
        ));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("agentd");
    }
    let ours = format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        STATEMENT_TIMEOUT.as_millis(),
        2 * ANSWER_TIMEOUT.as_millis()
    );
    let options = match config.get_options() {
        Some(theirs) => format!("{ours} {theirs}"),
        None => ours,
    };
    config.options(options);
    Ok(config)
}

/// The URL as logs and health show it: user, hosts, ports and database; a password, if there
/// is one, as `***`; nothing of the options.
pub(super) fn redacted(config: &Config) -> String {
    let mut shown = String::from("postgres://");
    if let Some(user) = config.get_user() {
        shown.push_str(user);
        if config.get_password().is_some() {
            shown.push_str(":***");
        }
        shown.push('@');
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                // A socket directory, percent-encoded as in the URL form.
                Host::Unix(path) => path
                    .display()
                    .to_string()
                    .replace('%', "%25")
                    .replace('/', "%2F"),
            };
            match ports.get(i).or(ports.first().filter(|_| ports.len() == 1)) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    shown.push_str(&hosts.join(","));
    shown.push('/');
    shown.push_str(config.get_dbname().unwrap_or_default());
    shown
}

/// A driver error in words: the server's message and SQLSTATE when the server answered,
/// otherwise what failed and why. None of it holds the URL or its password.
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Whether the connection is gone after this error (closed, broken, or ended by the server),
/// as opposed to one statement refused on a connection that goes on.
pub(super) fn ends_connection(error: &tokio_postgres::Error) -> bool {
    match error.as_db_error() {
        Some(db) => matches!(
            db.parsed_severity(),
            Some(Severity::Fatal | Severity::Panic)
        ),
        // Socket and protocol failures carry the I/O error; a value that did not convert
        // (ours to the server's or back) leaves the connection as it was.
        None => {
            error.is_closed()
                || std::error::Error::source(error)
                    .is_some_and(|cause| cause.is::<std::io::Error>())
        }
    }
}

/// A driver error as the storage reports it: `Unavailable` when the database could not be
/// reached or went away (a later attempt may work), `Postgres` when it refused a statement.
pub(super) fn storage_error(error: &tokio_postgres::Error) -> StorageError {
    let unreachable = ends_connection(error)
        || error.code().is_some_and(|code| {
            // Connection exceptions, too many connections, the server shutting down.
            let class = &code.code()[..2];
            matches!(class, "08" | "53" | "57") && code.code() != "57014"
        });
    if unreachable {
        StorageError::Unavailable(describe(error))
    } else {
        StorageError::Postgres(describe(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        for (url, shown) in [
            (
                "postgres://agentd:hunter2@db.internal:6543/sessions",
                "postgres://agentd:***@db.internal:6543/sessions",
            ),
            (
                "postgresql://agentd@db.internal/sessions?password=hunter2&sslmode=disable",
                "postgres://agentd:***@db.internal:5432/sessions",
            ),
            (
                "host=db.internal user=agentd password='hunter2 x' dbname=sessions",
                "postgres://agentd:***@db.internal/sessions",
            ),
            (
                "postgres://agentd:hunter2@a:1,b:2/s?options=-c%20search_path%3Dagentd",
                "postgres://agentd:***@a:1,b:2/s",
            ),
            (
                "postgres://agentd@%2Frun%2Fpostgresql/s",
                "postgres://agentd@%2Frun%2Fpostgresql:5432/s",
            ),
        ] {
            let config = settings(url).unwrap();
            assert_eq!(redacted(&config), shown, "{url}");
            assert!(!format!("{config:?}").contains("hunter2"), "{url}");
        }
    }

    #[test]
    fn our_timeouts_come_first_so_the_url_wins() {
        let config = settings("postgres://h/d?options=-c%20statement_timeout%3D5s").unwrap();
        let options = config.get_options().unwrap();
        assert!(
            options.starts_with("-c statement_timeout=30000 ")
                && options.ends_with("-c statement_timeout=5s"),
            "{options}"
        );
        assert_eq!(config.get_application_name(), Some("agentd"));
        assert_eq!(config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        let config = settings("postgres://h/d?connect_timeout=2&application_name=x").unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(config.get_application_name(), Some("x"));
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let err = settings("postgres://agentd:hunter2@h/d?port=nope")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.storage.url") && err.contains("port"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let err = settings("postgres://agentd:hunter2@h/d?sslmode=require")
            .unwrap_err()
            .to_string();
        assert!(err.contains("TLS"), "{err}");
    }
}
