use clap::Parser;

fn main() {
    let cli = shardc::cli::Cli::parse();
    if let Err(e) = shardc::run(cli) {
        // Rendered diagnostics already start with "error:".
        let text = format!("{e:#}");
        if text.starts_with("error:") {
            eprintln!("{text}");
        } else {
            eprintln!("error: {text}");
        }
        std::process::exit(1);
    }
}
