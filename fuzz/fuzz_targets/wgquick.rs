//! wg-quick config files, with literal endpoints only (no DNS while fuzzing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgtrace::topology::wgquick;

fn parsed(text: &str) -> Result<String, ()> {
    let literal_only = |value: &str| value.parse().map_err(anyhow::Error::from);
    wgquick::parse_with(text, literal_only)
        .map(|config| format!("{config:?} {}", config.effective_mark()))
        .map_err(|_| ())
}

fuzz_target!(|text: &str| {
    // The private key must not influence what is parsed (it is never kept).
    let scrubbed: String = text
        .split_inclusive('\n')
        .map(|line| {
            let is_private_key = line
                .split('#')
                .next()
                .and_then(|l| l.split_once('='))
                .is_some_and(|(key, _)| key.trim().eq_ignore_ascii_case("privatekey"));
            if is_private_key { "PrivateKey = 0\n".to_owned() } else { line.to_owned() }
        })
        .collect();
    assert_eq!(parsed(text), parsed(&scrubbed), "the private key changed the parsed config");
});
