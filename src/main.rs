fn main() -> std::process::ExitCode {
    deskline::app::main()
}
