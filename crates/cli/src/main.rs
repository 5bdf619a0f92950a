//! The `inboxd` command: the daemon and its tools.

mod accounts;
mod cluster;
mod commands;
mod demo;
mod http;
mod progress;
mod service;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use inboxd::config::Config;

#[derive(Parser)]
#[command(
    name = "inboxd",
    version,
    about = "Watch IMAP mailboxes and hand every new message, in order and with a stable idempotency key, to your code"
)]
struct Cli {
    /// Log format on stderr (default: pretty on a terminal, plain otherwise).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info`, `inboxd=debug` (also RUST_LOG).
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    log: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Plain,
    Json,
}

#[derive(Args)]
struct ConfigArg {
    /// The TOML config file.
    #[arg(short, long, env = "INBOXD_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch every configured folder until SIGINT/SIGTERM.
    Run(ConfigArg),
    /// Catch every watch up, deliver, and exit (non-zero if any watch failed).
    Once(ConfigArg),
    /// Validate the config, log in to every account, print capabilities and folder status.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also show where the routing would send each of the newest N messages of every
        /// watched folder (nothing is delivered or changed).
        #[arg(long, value_name = "N")]
        route: Option<u32>,
    },
    /// Show each watch's state, checkpoint, backlog and last mail, messages being retried, dead
    /// letters, what the routing skipped and post-actions not done.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Mark a dead letter as seen: it stays listed, but no longer fails /readyz.
    Ack {
        #[command(flatten)]
        config: ConfigArg,
        /// The dead letter's key, as shown by `status`.
        key: String,
    },
    /// Ask the running `inboxd run` on this config's state to reload the config (SIGHUP).
    Reload(ConfigArg),
    /// Deliver a logged message (e.g. a dead letter) again, by its key.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// The message's idempotency key, as shown by `status`.
        key: String,
    },
    /// Manage the accounts stored in the database (PostgreSQL state), beside the config file's.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Print a shell completion script (e.g. `inboxd completions bash > /etc/bash_completion.d/inboxd`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; e.g. `inboxd man > /usr/share/man/man1/inboxd.1`).
    Man,
    /// Start a throwaway Dovecot, watch it, append a few messages and show them processed.
    Demo {
        /// How many messages to append.
        #[arg(long, default_value_t = 3)]
        messages: usize,
    },
}

#[derive(Subcommand)]
enum AccountCmd {
    /// Validate an account's config text and store it, sealed with `accounts_key`; running
    /// instances start its watches within seconds.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// A TOML file with one `[accounts.NAME]` table, its `[[watch]]` tables and the
        /// `[targets.*]` they use (`-`: standard input).
        file: PathBuf,
        /// Replace a stored account of the same name.
        #[arg(long)]
        replace: bool,
    },
    /// Remove a stored account; running instances stop its watches after the delivery in
    /// flight.
    Remove {
        #[command(flatten)]
        config: ConfigArg,
        /// The account's name.
        name: String,
    },
    /// List the accounts of the config file and of the database.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a new random `accounts_key` (32 bytes, base64).
    Keygen,
}

fn init_logs(format: Option<LogFormat>, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // async-imap traces every command it sends, LOGIN with its password included: never let
    // that through, whatever the filter asks for.
    let filter = match "async_imap::imap_stream=off".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    // The platform verifier logs each refused certificate at ERROR; inboxd's own error says
    // it better, once.
    let filter = match "rustls_platform_verifier=off".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let tty = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if tty { LogFormat::Pretty } else { LogFormat::Plain });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if journal_stream() {
        // journald reads each line's priority from its `<N>` prefix and stamps the time itself.
        use tracing_subscriber::fmt::format as fmt;
        match format {
            LogFormat::Json => builder
                .fmt_fields(fmt::JsonFields::new())
                .event_format(Journald(fmt::format().json()))
                .init(),
            LogFormat::Pretty | LogFormat::Plain => builder
                .with_ansi(false)
                .event_format(Journald(fmt::format().without_time()))
                .init(),
        }
        return;
    }
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.with_ansi(true).init(),
        LogFormat::Plain => builder.with_ansi(false).init(),
    }
}

/// Whether stderr is the journal: systemd says so in `$JOURNAL_STREAM` (`device:inode` of the
/// stream it connected), which must name our stderr (not one a parent handed down).
fn journal_stream() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected.to_str() == Some(format!("{}:{}", meta.dev(), meta.ino()).as_str())
}

/// Prefixes each log line with its syslog priority (`<3>` error, `<4>` warning, `<6>` info,
/// `<7>` debug), as journald reads it from a service's output (sd-daemon(3)).
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The config file, and with PostgreSQL state the accounts stored in the database.
async fn load(arg: &ConfigArg) -> anyhow::Result<Config> {
    accounts::load(&arg.config).await
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    match cli.command {
        Cmd::Run(c) => {
            inboxd::process::raise_open_files_limit();
            commands::run(&load(&c).await?).await
        }
        Cmd::Once(c) => {
            inboxd::process::raise_open_files_limit();
            commands::once(&load(&c).await?).await
        }
        Cmd::Check { config, route } => commands::check(&load(&config).await?, route, &mut stdout).await,
        Cmd::Status { config, json } => commands::status(&load(&config).await?, json, &mut stdout).await,
        Cmd::Reload(c) => commands::reload_running(&Config::load(&c.config)?),
        Cmd::Ack { config, key } => commands::acknowledge(&load(&config).await?, &key).await,
        Cmd::Replay { config, key } => commands::replay(&load(&config).await?, &key).await,
        Cmd::Account(AccountCmd::Add { config, file, replace }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read the account from standard input")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            accounts::add_command(&config.config, &text, replace, &mut stdout).await
        }
        Cmd::Account(AccountCmd::Remove { config, name }) => {
            accounts::remove_command(&config.config, &name, &mut stdout).await
        }
        Cmd::Account(AccountCmd::List { config, json }) => {
            accounts::list_command(&config.config, json, &mut stdout).await
        }
        Cmd::Account(AccountCmd::Keygen) => {
            use std::io::Write;
            writeln!(stdout, "{}", inboxd::sealed::SealingKey::generate()?.expose())?;
            Ok(())
        }
        Cmd::Demo { messages } => demo::run(messages).await.context("demo failed"),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "inboxd", &mut stdout);
            Ok(())
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut stdout)?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("inboxd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `inboxd status | head`: the reader has what it wanted; that is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inboxd: {e:#}");
            if e.downcast_ref::<inboxd::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
