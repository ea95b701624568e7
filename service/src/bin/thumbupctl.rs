//! `thumbupctl`: a small command-line client of the `thumbup.v1.Thumbup` gRPC API.
//!
//! Every subcommand makes one call (or, for a list with `--all`, one call per
//! page) as one tenant: the tenant and its token travel as the metadata
//! `x-thumbup-tenant: <tenant>` and `authorization: Bearer <token>` on every
//! request. The output is plain text meant for people and for scripts alike:
//! first a line starting with `> ` that restates the call, then the result,
//! indented by two spaces, one fact per line, maps sorted by key:
//!
//! ```text
//! > like tenant=demo business=1 mid=1001 message=7 up=42
//!   state=LIKE likes=1 dislikes=0 version=7349218031583232
//! ```
//!
//! A call that fails prints `  error: <CODE>: <message>` (the gRPC code as the
//! protocol spells it, e.g. `FAILED_PRECONDITION`) and the process exits with
//! status 1, so a script can tolerate an expected failure with `|| true`.
//!
//! ```text
//! thumbupctl --tenant demo --token demo-token-0001 like --mid 1001 --message 7 --up 42
//! thumbupctl counts 7 8 9           # tenant and token from THUMBUP_TENANT / THUMBUP_TOKEN
//! thumbupctl list --mid 1001 --all  # follows next_page_token to the last page
//! ```

use std::collections::BTreeMap;
use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use thumbup_service::pb;
use thumbup_service::pb::thumbup_client::ThumbupClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Metadata key naming the tenant (the service's `api::TENANT_HEADER`).
const TENANT_HEADER: &str = thumbup_service::api::TENANT_HEADER;

/// Command line of `thumbupctl`.
#[derive(Parser, Debug)]
#[command(version, about = "command-line client of the thumbup gRPC API")]
struct Cli {
    /// gRPC address of thumbup-service: http://host:port, or
    /// https://host:port for a service started with --tls-cert-file.
    #[arg(long, env = "THUMBUP_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// PEM CA file that the service's certificate must chain to (https://
    /// only; default: the system's roots).
    #[arg(long, env = "THUMBUP_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Tenant sent as `x-thumbup-tenant` (omitted when unset).
    #[arg(long, env = "THUMBUP_TENANT")]
    tenant: Option<String>,
    /// Tenant API token sent as `authorization: Bearer <token>` (omitted when unset).
    #[arg(long, env = "THUMBUP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Business id the call is about.
    #[arg(long, env = "THUMBUP_BUSINESS", default_value_t = 1)]
    business: i64,
    /// Seconds a single call may take.
    #[arg(long, env = "THUMBUP_TIMEOUT_SECS", default_value_t = 10)]
    timeout_secs: u64,
    #[command(subcommand)]
    command: Command,
}

/// One user's action on one item.
#[derive(Args, Debug)]
struct ActionArgs {
    /// The acting user.
    #[arg(long)]
    mid: i64,
    /// The item.
    #[arg(long)]
    message: i64,
    /// The item's owner (credited with received likes).
    #[arg(long)]
    up: i64,
}

/// Paging of a list call.
#[derive(Args, Debug)]
struct PageArgs {
    /// Entries per page (1..=100).
    #[arg(long, default_value_t = 20)]
    page_size: u32,
    /// Start after this token (a previous page's `next_page_token`).
    #[arg(long, default_value = "")]
    page_token: String,
    /// Follow `next_page_token` to the last page.
    #[arg(long)]
    all: bool,
}

/// The calls.
#[derive(Subcommand, Debug)]
enum Command {
    /// Like an item (Like RPC, ACTION_LIKE).
    Like(ActionArgs),
    /// Withdraw a like (Like RPC, ACTION_UNLIKE).
    Unlike(ActionArgs),
    /// Dislike an item, replacing a like (Like RPC, ACTION_DISLIKE).
    Dislike(ActionArgs),
    /// Withdraw a dislike (Like RPC, ACTION_UNDISLIKE).
    Undislike(ActionArgs),
    /// A user's states on items (GetStates).
    States {
        /// The user.
        #[arg(long)]
        mid: i64,
        /// Item ids (1 to 100).
        #[arg(required = true, num_args = 1..)]
        messages: Vec<i64>,
    },
    /// Like and dislike counts of items (GetCounts).
    Counts {
        /// Item ids (1 to 100).
        #[arg(required = true, num_args = 1..)]
        messages: Vec<i64>,
    },
    /// The items a user likes, newest first (ListUserLikes).
    List {
        /// The user.
        #[arg(long)]
        mid: i64,
        #[command(flatten)]
        page: PageArgs,
    },
    /// The users who like an item, newest first (ListItemLikers).
    Likers {
        /// The item.
        #[arg(long)]
        message: i64,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Likes received by an item owner over all their items (GetReceivedLikes).
    Received {
        /// The owner.
        #[arg(long)]
        up: i64,
    },
}

/// Adds the tenant and token metadata to every request.
#[derive(Clone)]
struct Credentials {
    tenant: Option<MetadataValue<Ascii>>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// Checks that both values can travel as ASCII metadata.
    fn new(tenant: Option<&str>, token: Option<&str>) -> anyhow::Result<Credentials> {
        let tenant =
            tenant.map(|t| t.parse().context("--tenant is not valid metadata (printable ASCII)")).transpose()?;
        let authorization = token
            .map(|t| format!("Bearer {t}").parse().context("--token is not valid metadata (printable ASCII)"))
            .transpose()?;
        Ok(Credentials { tenant, authorization })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata_mut();
        if let Some(t) = &self.tenant {
            md.insert(TENANT_HEADER, t.clone());
        }
        if let Some(a) = &self.authorization {
            md.insert("authorization", a.clone());
        }
        Ok(req)
    }
}

/// The generated client behind the credentials interceptor.
type Client = ThumbupClient<InterceptedService<Channel, Credentials>>;

/// The protocol's name of a gRPC code (`FAILED_PRECONDITION`), as grpcurl and
/// the gRPC docs print it; tonic's `Debug` gives `FailedPrecondition`.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `STATE_LIKE` as `LIKE`; a value this client does not know as `UNKNOWN(n)`.
fn state_name(state: i32) -> String {
    match pb::State::try_from(state) {
        Ok(s) => s.as_str_name().trim_start_matches("STATE_").to_string(),
        Err(_) => format!("UNKNOWN({state})"),
    }
}

/// Unix milliseconds as UTC `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian,
/// Howard Hinnant's `civil_from_days`), so no date crate is needed.
fn utc(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// The status message, followed by the causes of a client-side (transport)
/// failure, which tonic keeps out of the message: `tcp connect error` alone
/// does not say that the connection was refused.
fn describe(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let line = e.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = e.source();
    }
    text
}

/// Comma-separated ids for the call line.
fn joined(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Prints the line that restates the call.
fn call_line(what: impl Display) {
    println!("> {what}");
}

/// Prints one result line.
fn out(line: impl Display) {
    println!("  {line}");
}

/// Runs the command; `Err` is a gRPC failure, already attributed to the call
/// by the call line printed before it.
async fn execute(client: &mut Client, business: i64, who: &str, command: Command) -> Result<(), Status> {
    match command {
        Command::Like(a) => act(client, business, who, "like", pb::Action::Like, a).await,
        Command::Unlike(a) => act(client, business, who, "unlike", pb::Action::Unlike, a).await,
        Command::Dislike(a) => act(client, business, who, "dislike", pb::Action::Dislike, a).await,
        Command::Undislike(a) => act(client, business, who, "undislike", pb::Action::Undislike, a).await,
        Command::States { mid, messages } => {
            call_line(format_args!("states {who} mid={mid} messages={}", joined(&messages)));
            let req = pb::GetStatesRequest { business_id: business, mid, message_ids: messages };
            let reply = client.get_states(req).await?.into_inner();
            for (message, state) in reply.states.into_iter().collect::<BTreeMap<_, _>>() {
                out(format_args!("message={message} state={}", state_name(state)));
            }
            Ok(())
        }
        Command::Counts { messages } => {
            call_line(format_args!("counts {who} messages={}", joined(&messages)));
            let req = pb::GetCountsRequest { business_id: business, message_ids: messages };
            let reply = client.get_counts(req).await?.into_inner();
            for (message, c) in reply.counts.into_iter().collect::<BTreeMap<_, _>>() {
                out(format_args!("message={message} likes={} dislikes={}", c.likes, c.dislikes));
            }
            Ok(())
        }
        Command::List { mid, page } => {
            call_line(format_args!("list {who} mid={mid}{}", page_desc(&page)));
            let mut token = page.page_token;
            let mut total = 0;
            loop {
                let req = pb::ListUserLikesRequest {
                    business_id: business,
                    mid,
                    page_size: page.page_size,
                    page_token: token,
                };
                let reply = client.list_user_likes(req).await?.into_inner();
                total += reply.items.len();
                for i in &reply.items {
                    out(format_args!("message={} liked_at={}", i.message_id, utc(i.liked_at_ms)));
                }
                token = reply.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            page_end(total, &token);
            Ok(())
        }
        Command::Likers { message, page } => {
            call_line(format_args!("likers {who} message={message}{}", page_desc(&page)));
            let mut token = page.page_token;
            let mut total = 0;
            loop {
                let req = pb::ListItemLikersRequest {
                    business_id: business,
                    message_id: message,
                    page_size: page.page_size,
                    page_token: token,
                };
                let reply = client.list_item_likers(req).await?.into_inner();
                total += reply.likers.len();
                for l in &reply.likers {
                    out(format_args!("mid={} liked_at={}", l.mid, utc(l.liked_at_ms)));
                }
                token = reply.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            page_end(total, &token);
            Ok(())
        }
        Command::Received { up } => {
            call_line(format_args!("received {who} up={up}"));
            let req = pb::GetReceivedLikesRequest { business_id: business, up_mid: up };
            let reply = client.get_received_likes(req).await?.into_inner();
            out(format_args!("likes={}", reply.likes));
            Ok(())
        }
    }
}

/// One Like RPC.
async fn act(
    client: &mut Client,
    business: i64,
    who: &str,
    verb: &str,
    action: pb::Action,
    a: ActionArgs,
) -> Result<(), Status> {
    call_line(format_args!("{verb} {who} mid={} message={} up={}", a.mid, a.message, a.up));
    let req = pb::LikeRequest {
        business_id: business,
        message_id: a.message,
        mid: a.mid,
        up_mid: a.up,
        action: action as i32,
    };
    let reply = client.like(req).await?.into_inner();
    let c = reply.counts.unwrap_or_default();
    out(format_args!(
        "state={} likes={} dislikes={} version={}",
        state_name(reply.state),
        c.likes,
        c.dislikes,
        reply.version
    ));
    Ok(())
}

/// The paging part of a list's call line.
fn page_desc(p: &PageArgs) -> String {
    let mut s = format!(" page_size={}", p.page_size);
    if !p.page_token.is_empty() {
        s.push_str(&format!(" page_token={}", p.page_token));
    }
    if p.all {
        s.push_str(" all");
    }
    s
}

/// The closing line of a list: how many entries, and where to go on.
fn page_end(total: usize, next: &str) {
    if next.is_empty() {
        out(format_args!("({total} shown, end of list)"));
    } else {
        out(format_args!("({total} shown, next_page_token={next})"));
    }
}

/// Connects (lazily: an unreachable server shows as the call's UNAVAILABLE)
/// and runs the command: exit status 1 when the call fails, `Err` for bad
/// flags.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let creds = Credentials::new(cli.tenant.as_deref(), cli.token.as_deref())?;
    let channel = thumbup_service::client_endpoint(&cli.addr, cli.ca_file.as_deref())
        .with_context(|| format!("--addr {:?} / --ca-file", cli.addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(cli.timeout_secs))
        .connect_lazy();
    let mut client = ThumbupClient::with_interceptor(channel, creds);
    // Who is asking about what: repeated on every call line.
    let who = match &cli.tenant {
        Some(t) => format!("tenant={t} business={}", cli.business),
        None => format!("business={}", cli.business),
    };
    match execute(&mut client, cli.business, &who, cli.command).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(status) => {
            out(format_args!("error: {}: {}", code_name(status.code()), describe(&status)));
            Ok(ExitCode::FAILURE)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        // A usage error, like clap's: no call was made.
        Err(e) => {
            eprintln!("thumbupctl: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_millis_as_iso_8601() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn states_print_without_prefix_and_unknown_values_survive() {
        assert_eq!(state_name(pb::State::Like as i32), "LIKE");
        assert_eq!(state_name(pb::State::None as i32), "NONE");
        assert_eq!(state_name(9), "UNKNOWN(9)");
    }

    #[test]
    fn cli_parses_every_subcommand() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["thumbupctl", "--tenant", "t", "states", "--mid", "3", "1", "2"]).unwrap();
        assert!(matches!(cli.command, Command::States { mid: 3, ref messages } if messages == &[1, 2]));
        assert!(Cli::try_parse_from(["thumbupctl", "counts"]).is_err());
    }
}
