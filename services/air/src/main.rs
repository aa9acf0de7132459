//! `air`: the command-line front end. Each subcommand lives in its own module; this file only
//! parses flags and turns errors into one line on stderr with a non-zero exit.

mod bench;
mod check;
mod cli;
mod generate;
mod generation;
mod info;
mod loaded;
mod logging;
mod perplexity;
mod serve;
mod serving;
mod serving_bench;
mod synth;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    match &cli.command {
        cli::Command::Serve(args) => logging::init("info", args.log_format),
        _ => logging::init("warn", cli::Format::Text),
    }
    let result = match cli.command {
        cli::Command::Generate(args) => generate::run(args),
        cli::Command::Info(args) => info::run(args),
        cli::Command::Bench(args) => bench::run(args),
        cli::Command::Perplexity(args) => perplexity::run(args),
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Synth(args) => synth::run(args),
        cli::Command::Check(args) => check::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
