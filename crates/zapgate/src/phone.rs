//! Phone numbers as Z-API takes them: country code first, digits only.

/// Strips `+`, spaces, dashes and parentheses and checks what is left: 7 to 15 digits,
/// not starting with 0. The error says what is wrong.
pub fn normalize(raw: &str) -> Result<String, String> {
    let digits: String = raw
        .chars()
        .filter(|c| !matches!(c, '+' | ' ' | '-' | '(' | ')'))
        .collect();
    if digits.is_empty() {
        return Err("phone is empty".into());
    }
    if let Some(bad) = digits.chars().find(|c| !c.is_ascii_digit()) {
        return Err(format!("phone may only contain digits, found {bad:?}"));
    }
    if !(7..=15).contains(&digits.len()) {
        return Err(format!(
            "phone must have 7 to 15 digits with the country code, found {}",
            digits.len()
        ));
    }
    if digits.starts_with('0') {
        return Err("phone must start with the country code, not 0".into());
    }
    Ok(digits)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn formatting_is_stripped() {
        assert_eq!(
            normalize("+55 (11) 99999-0001").as_deref(),
            Ok("5511999990001")
        );
        assert_eq!(normalize("5511999990001").as_deref(), Ok("5511999990001"));
    }

    #[test]
    fn bad_numbers_say_why() {
        assert!(normalize("").unwrap_err().contains("empty"));
        assert!(normalize("55119999a0001").unwrap_err().contains("digits"));
        assert!(normalize("123456").unwrap_err().contains("7 to 15"));
        assert!(
            normalize("1234567890123456")
                .unwrap_err()
                .contains("7 to 15")
        );
        assert!(
            normalize("011999990001")
                .unwrap_err()
                .contains("country code")
        );
    }

    proptest::proptest! {
        /// Anything at all: never a panic; accepted exactly when what is left after
        /// the formatting characters is a valid number, refused with a reason otherwise.
        #[test]
        fn any_input_is_accepted_or_refused_with_a_reason(raw in ".*") {
            let left: String = raw
                .chars()
                .filter(|c| !matches!(c, '+' | ' ' | '-' | '(' | ')'))
                .collect();
            let valid = (7..=15).contains(&left.len())
                && left.bytes().all(|b| b.is_ascii_digit())
                && !left.starts_with('0');
            match normalize(&raw) {
                Ok(digits) => {
                    proptest::prop_assert!(valid);
                    proptest::prop_assert_eq!(digits, left);
                }
                Err(why) => {
                    proptest::prop_assert!(!valid);
                    proptest::prop_assert!(why.starts_with("phone "), "{}", why);
                }
            }
        }

        #[test]
        fn formatted_numbers_keep_their_digits(
            digits in "[1-9][0-9]{6,14}",
            cut in 1usize..7,
        ) {
            let (country, rest) = digits.split_at(1);
            let (area, number) = rest.split_at(cut.min(rest.len()));
            let formatted = format!("+{country} ({area}) {number}-");
            proptest::prop_assert_eq!(normalize(&formatted), Ok(digits));
        }
    }
}
