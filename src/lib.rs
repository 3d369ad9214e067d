//! The `shardc` command-line tool. The binary in `main.rs` only parses arguments and calls
//! [`run`]; errors are rendered here, at the edge.

pub mod cli;
pub mod commands;
pub mod compile;
pub mod export;
pub mod host;
pub mod inspect;
pub mod kernels;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod render;
pub mod train;

use cli::{Cli, Command};

/// Runs one command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Import(a) => commands::import(a),
        Command::Check(a) => commands::check(a),
        Command::Eval(a) => commands::eval(a),
        Command::Train(a) => train::train(a),
        Command::Data(c) => commands::data(c),
        Command::Plan(a) => plan::plan(a),
        Command::Compile(a) => compile::compile(a),
        Command::Run(a) => train::run(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Export(a) => export::export(a),
        Command::Explain(a) => compile::explain(a),
        Command::Opt(a) => commands::opt(a),
        Command::Ops => commands::ops(),
    }
}
