//! wg-quick config files, with literal endpoints only (no DNS while fuzzing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgtrace::topology::wgquick;

fuzz_target!(|text: &str| {
    let literal_only = |value: &str| value.parse().map_err(anyhow::Error::from);
    if let Ok(config) = wgquick::parse_with(text, literal_only) {
        let _ = config.effective_mark();
        assert!(!format!("{config:?}").to_lowercase().contains("privatekey"));
    }
});
