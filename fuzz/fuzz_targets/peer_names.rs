//! `--peer-names` files and `friendly_name` comments: never a panic, names
//! bounded and printable, and an error never echoes the input (a pasted
//! private key must not end up in a log).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgtrace::names;

fuzz_target!(|text: &str| {
    match names::parse_names_file(text) {
        Ok(parsed) => {
            for name in parsed.values() {
                assert!(name.chars().count() <= 64 && !name.chars().any(char::is_control), "{name:?}");
            }
        }
        Err(err) => {
            let message = format!("{err:#}");
            let template: String = message.chars().filter(|c| !c.is_ascii_digit()).collect();
            assert!(
                [
                    "line : expected PUBLIC_KEY = NAME",
                    "line : the first field is not a WireGuard public key ( characters of base)",
                    "line : no name after '='",
                ]
                .contains(&template.as_str()),
                "an error beyond its templates: {message}"
            );
        }
    }
    for name in names::friendly_names(text).values() {
        assert!(name.chars().count() <= 64 && !name.chars().any(char::is_control), "{name:?}");
    }
});
