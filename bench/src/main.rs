//! thumbup-bench: parses the command line and hands it to [`thumbup_bench::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = thumbup_bench::Args::parse();
    if args.reset {
        return thumbup_bench::reset::reset(&args).await;
    }
    let out = args.out.clone();
    let report = thumbup_bench::run(args).await?;
    print!("{}", thumbup_bench::report::render_markdown(&report));
    eprintln!("thumbup-bench: wrote {0}/report.md and {0}/latency.svg", out.display());
    Ok(())
}
