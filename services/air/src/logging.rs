//! Logs on stderr through `tracing`: what `AIR_LOG` asks for (an env-filter such as `info` or
//! `warn,air_gateway=debug`), else the command's default level; as text, or as one JSON object
//! per line for log collectors.

use crate::cli::Format;
use tracing_subscriber::EnvFilter;

/// Installs the process's subscriber. A malformed `AIR_LOG` falls back to `default_level` with
/// a warning rather than stopping the command.
pub fn init(default_level: &str, format: Format) {
    let (filter, bad) = match std::env::var("AIR_LOG") {
        Ok(spec) => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(default_level), Some(format!("ignoring AIR_LOG={spec:?}: {e}"))),
        },
        Err(_) => (EnvFilter::new(default_level), None),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    let installed = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().flatten_event(true).try_init(),
    };
    if let (Ok(()), Some(warning)) = (installed, bad) {
        tracing::warn!("{warning}");
    }
}
