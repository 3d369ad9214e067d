use clap::Parser;

fn main() {
    // `shardc plan ... | head` should end quietly when the reader stops, as Unix tools do,
    // not panic on a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = shardc::cli::Cli::parse();
    if let Err(e) = shardc::run(cli) {
        if let Some(over) = e.downcast_ref::<shardc::plan::DoesNotFit>() {
            eprintln!("error: {over}");
            std::process::exit(shardc::plan::DOES_NOT_FIT_EXIT);
        }
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
