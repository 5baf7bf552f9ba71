use clap::Parser;
use ultrapixel::cli::{run, Cli};

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ultrapixel::cli::exit_code(&e)
        }
    };
    std::process::exit(code);
}
