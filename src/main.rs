//! `hearth`: the homeserver and its operator commands.
//!
//! With no command it runs the server. `generate-config` prints the commented example
//! configuration; `user …`, `registration-token …` and `media …` act on the database directly
//! (safe while the server runs); `keys rotate` replaces the signing key in the data directory.

use std::{io::BufRead, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: glibc kept each argon2 hashing buffer (19 MiB) resident
/// after concurrent registrations (2 GiB after 200 of them), and mimalloc is also faster for the
/// many small allocations of request handling. Built with `no_thp` (Cargo.toml): mimalloc
/// otherwise asks for transparent huge pages on its arenas, so each thread's first small
/// allocations made 2 MiB resident (start-up RSS 60 MiB instead of 25 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
unsafe extern "C" {
    /// mimalloc's collection of the calling thread's heap (part of the statically linked
    /// library; the Rust crate binds it only behind its `extended` feature).
    fn mi_collect(force: bool);
}

/// At most once a second per worker thread, as it goes idle: hand the memory its heap no longer
/// uses back to the OS. mimalloc purges freed pages only from inside the owning thread's own
/// allocations, so a worker that went quiet after 10,000 sockets closed kept their memory.
fn return_freed_memory() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        let now = std::time::Instant::now();
        if last.get().is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1)) {
            last.set(Some(now));
            // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
            unsafe { mi_collect(false) };
        }
    });
}

use hearth::{
    app::{self, AppError},
    config::{self, Config, LogFormat},
    service::users::Users,
};

#[derive(Parser)]
#[command(name = "hearth", version, about = "A Matrix homeserver: complete, correct, fast and light.")]
struct Cli {
    /// Configuration file (TOML). Without one, defaults and HEARTH_* environment variables apply.
    #[arg(long, short, global = true, env = "HEARTH_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver (the default).
    Run,
    /// Write a commented example configuration with every key and its default.
    GenerateConfig {
        /// Write to this file instead of standard output (refuses to overwrite).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage registration tokens (for `registration.mode = "token"`).
    #[command(subcommand)]
    RegistrationToken(TokenCommand),
    /// Manage the server's signing key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage stored media (safe while the server runs).
    #[command(subcommand)]
    Media(MediaCommand),
}

#[derive(Subcommand)]
enum MediaCommand {
    /// Serve a file to no one any more (it stays stored; `--release` undoes it).
    Quarantine {
        /// The file's `mxc://server/id` URI.
        uri: String,
        #[arg(long)]
        release: bool,
    },
    /// Delete a file, its thumbnails and (when no other URI has the same content) its bytes.
    Delete { uri: String },
    /// List a user's uploads and the space they take.
    ListUser { user: String },
    /// The space each user's uploads take, the largest first.
    Usage,
    /// Delete the cached copies of other servers' media not used since a date.
    PurgeRemote {
        /// `YYYY-MM-DD`, or a number of days ago such as `30d`; `now` purges every copy.
        #[arg(long)]
        before: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Replace the signing key with a new one; the old key stays published in `old_verify_keys`
    /// (expired now), so events it signed stay verifiable. Takes effect at the next start.
    Rotate,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account (whatever the registration mode).
    Create {
        /// The local part of the user ID, e.g. `alice` for @alice:server_name.
        localpart: String,
        /// The password; read from standard input when absent.
        #[arg(long)]
        password: Option<String>,
        /// Make the account a server administrator.
        #[arg(long)]
        admin: bool,
    },
    /// List every account.
    List,
    /// Deactivate an account for good: it is logged out everywhere and can never log in again.
    Deactivate { user: String },
    /// Set a new password and log the account out everywhere.
    ResetPassword {
        user: String,
        /// The new password; read from standard input when absent.
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a registration token and print it.
    Create {
        /// The token text (default: 16 random characters).
        #[arg(long)]
        token: Option<String>,
        /// How many registrations it allows (default: unlimited).
        #[arg(long)]
        uses: Option<i64>,
        /// Days until it expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List registration tokens and their use.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hearth::federation::tls::install_default_provider();
    if let Some(Command::GenerateConfig { output }) = &cli.command {
        return report(generate_config(output.as_deref()));
    }
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let is_server = matches!(cli.command, None | Some(Command::Run));
    init_logging(&config, is_server);
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().on_thread_park(return_freed_memory).build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("error: cannot start the async runtime: {err}");
                return ExitCode::FAILURE;
            }
        };
    let result = runtime.block_on(async {
        match cli.command {
            None | Some(Command::Run) => app::run(config).await,
            Some(Command::User(command)) => user_command(&config, command).await,
            Some(Command::RegistrationToken(command)) => token_command(&config, command).await,
            Some(Command::Keys(KeysCommand::Rotate)) => rotate_key(&config),
            Some(Command::Media(command)) => media_command(&config, command).await,
            Some(Command::GenerateConfig { .. }) => unreachable!("handled above"),
        }
    });
    report(result)
}

fn report(result: Result<(), AppError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config, is_server: bool) {
    // Operator commands print their own results; only warnings from the layers below are wanted.
    let default_level = if is_server { config.logging.level.as_str() } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.logging.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.init(),
    }
}

fn generate_config(output: Option<&std::path::Path>) -> Result<(), AppError> {
    match output {
        None => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|err| AppError(format!("cannot create {}: {err}", path.display())))?;
            std::io::Write::write_all(&mut file, config::EXAMPLE.as_bytes())
                .map_err(|err| AppError(format!("cannot write {}: {err}", path.display())))?;
            eprintln!("wrote {}", path.display());
            Ok(())
        }
    }
}

async fn with_users<T>(
    config: &Config,
    action: impl AsyncFnOnce(&Users) -> Result<T, AppError>,
) -> Result<T, AppError> {
    let db = app::open_database(config).await?;
    let users = Users::new(db.clone(), config);
    let result = action(&users).await;
    db.close().await;
    result
}

fn password_or_stdin(password: Option<String>) -> Result<String, AppError> {
    if let Some(password) = password {
        return Ok(password);
    }
    eprint!("password: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|err| AppError(format!("cannot read password: {err}")))?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(AppError("no password given".to_owned()));
    }
    Ok(password)
}

fn local_user(config: &Config, user: &str) -> Result<ruma::OwnedUserId, AppError> {
    hearth::matrix::identifiers::user_id_for_login(user, &config.server_name)
        .ok_or_else(|| AppError(format!("{user} is not a user of {}", config.server_name)))
}

fn fail(err: hearth::error::Error) -> AppError {
    AppError(err.to_string())
}

async fn user_command(config: &Config, command: UserCommand) -> Result<(), AppError> {
    match command {
        UserCommand::Create { localpart, password, admin } => {
            let password = password_or_stdin(password)?;
            let user_id = with_users(config, async |users| {
                users.operator_create_user(&localpart, &password, admin).await.map_err(fail)
            })
            .await?;
            println!("created {user_id}");
        }
        UserCommand::List => {
            let rows = with_users(config, async |users| users.operator_list_users().await.map_err(fail)).await?;
            println!("{:<40} {:<6} {:<6} STATE", "USER", "ADMIN", "GUEST");
            for row in rows {
                let state = if row.deactivated { "deactivated" } else { "active" };
                println!("{:<40} {:<6} {:<6} {state}", row.user_id, row.is_admin, row.is_guest);
            }
        }
        UserCommand::Deactivate { user } => {
            let user_id = local_user(config, &user)?;
            with_users(config, async |users| users.operator_deactivate(&user_id).await.map_err(fail)).await?;
            println!("deactivated {user_id}");
        }
        UserCommand::ResetPassword { user, password } => {
            let user_id = local_user(config, &user)?;
            let password = password_or_stdin(password)?;
            with_users(config, async |users| users.operator_reset_password(&user_id, &password).await.map_err(fail))
                .await?;
            println!("reset the password of {user_id} and logged it out everywhere");
        }
    }
    Ok(())
}

/// `--before` of `media purge-remote`: a date (midnight UTC) or `N` days ago, in ms.
fn before_ts(text: &str) -> Result<i64, AppError> {
    let now = hearth::service::now_ms();
    if text == "now" {
        return Ok(i64::MAX);
    }
    if let Some(days) = text.strip_suffix('d').and_then(|days| days.parse::<i64>().ok()) {
        return Ok(now - days * 86_400_000);
    }
    let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| AppError(format!("--before {text}: give a date (YYYY-MM-DD), a number of days (30d) or now")))?;
    Ok(date.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp_millis()))
}

fn mxc(uri: &str) -> Result<(String, String), AppError> {
    hearth::service::media::parse_mxc(uri)
        .map(|(server, id)| (server.to_string(), id))
        .ok_or_else(|| AppError(format!("{uri} is not an mxc://server/id URI")))
}

async fn media_command(config: &Config, command: MediaCommand) -> Result<(), AppError> {
    let db = app::open_database(config).await?;
    let media = hearth::service::media::Media::new(db.clone(), config, None).map_err(AppError)?;
    let result = async {
        match command {
            MediaCommand::Quarantine { uri, release } => {
                let (origin, id) = mxc(&uri)?;
                if !media.set_quarantined(&origin, &id, !release).await.map_err(fail)? {
                    return Err(AppError(format!("no media {uri} is stored here")));
                }
                println!("{} {uri}", if release { "released" } else { "quarantined" });
            }
            MediaCommand::Delete { uri } => {
                let (origin, id) = mxc(&uri)?;
                if !media.delete(&origin, &id).await.map_err(fail)? {
                    return Err(AppError(format!("no media {uri} is stored here")));
                }
                println!("deleted {uri}");
            }
            MediaCommand::ListUser { user } => {
                let user_id = local_user(config, &user)?;
                let (rows, bytes) = media.of_user(&user_id).await.map_err(fail)?;
                println!("{:<60} {:>12} {:<24} {:<5} NAME", "URI", "BYTES", "TYPE", "QUAR.");
                for row in &rows {
                    println!(
                        "{:<60} {:>12} {:<24} {:<5} {}",
                        format!("mxc://{}/{}", row.origin, row.media_id),
                        row.size.map_or_else(|| "pending".to_owned(), |size| size.to_string()),
                        row.content_type.as_deref().unwrap_or("-"),
                        row.quarantined,
                        row.filename.as_deref().unwrap_or("")
                    );
                }
                println!("{user_id}: {} files, {bytes} bytes", rows.len());
            }
            MediaCommand::Usage => {
                let rows = db.media_usage_by_user().await.map_err(|err| AppError(err.to_string()))?;
                println!("{:<40} {:>8} {:>14}", "USER", "FILES", "BYTES");
                for row in rows {
                    println!("{:<40} {:>8} {:>14}", row.uploader, row.files, row.bytes);
                }
            }
            MediaCommand::PurgeRemote { before } => {
                let purged = media.purge_remote(before_ts(&before)?).await.map_err(fail)?;
                println!("purged {purged} cached remote files");
            }
        }
        Ok(())
    }
    .await;
    db.close().await;
    result
}

fn rotate_key(config: &Config) -> Result<(), AppError> {
    let (old, new) = hearth::service::server_keys::ServerKeys::rotate(&config.data_dir, hearth::service::now_ms())
        .map_err(AppError)?;
    println!(
        "rotated the signing key: {old} -> {new} ({old} stays listed in old_verify_keys); restart Hearth to use it"
    );
    Ok(())
}

async fn token_command(config: &Config, command: TokenCommand) -> Result<(), AppError> {
    match command {
        TokenCommand::Create { token, uses, expires_in_days } => {
            let expiry = expires_in_days.map(|days| hearth::service::now_ms() + i64::from(days) * 86_400_000);
            let row = with_users(config, async |users| {
                users.operator_create_registration_token(token, uses, expiry).await.map_err(fail)
            })
            .await?;
            println!("{}", row.token);
        }
        TokenCommand::List => {
            let rows =
                with_users(config, async |users| users.operator_list_registration_tokens().await.map_err(fail)).await?;
            println!("{:<24} {:<8} {:<8} {:<10} VALID", "TOKEN", "ALLOWED", "PENDING", "COMPLETED");
            let now = hearth::service::now_ms();
            for row in rows {
                let allowed = row.uses_allowed.map_or_else(|| "any".to_owned(), |n| n.to_string());
                println!(
                    "{:<24} {:<8} {:<8} {:<10} {}",
                    row.token,
                    allowed,
                    row.pending,
                    row.completed,
                    row.is_valid(now)
                );
            }
        }
    }
    Ok(())
}
