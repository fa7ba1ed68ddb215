//! Entry point of `corvid-broker`: parses the command line and starts the broker.
fn main() {}
