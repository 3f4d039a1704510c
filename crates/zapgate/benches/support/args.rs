//! The benches' command line: `--name value` numbers and repeatable `--env K=V`.

pub(crate) struct CommandLine(Vec<String>);

impl CommandLine {
    pub(crate) fn read() -> Self {
        Self(std::env::args().collect())
    }

    /// The number after `name`, or `default` when it is not given.
    pub(crate) fn number(&self, name: &str, default: u64) -> u64 {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number"))
            })
            .unwrap_or(default)
    }

    /// Every `--env K=V`: set for the gateway (allocator settings, log levels).
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        self.0
            .windows(2)
            .filter(|w| w[0] == "--env")
            .map(|w| {
                let (k, v) = w[1].split_once('=').expect("--env takes K=V");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }
}
