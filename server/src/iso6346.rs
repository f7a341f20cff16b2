//! ISO 6346 freight container numbers: owner code, category, serial, check digit.

/// Why a container number is not valid ISO 6346.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerNumberError {
    /// Not 11 characters.
    #[error(
        "container number {0:?} must be 11 characters: 3-letter owner code, category letter U/J/Z/R, 6 digits, check digit"
    )]
    Length(String),
    /// Owner code or category letter wrong.
    #[error("container number {0:?} must start with a 3-letter owner code and a category letter U, J, Z or R")]
    Prefix(String),
    /// Serial or check digit not numeric.
    #[error("container number {0:?} must end with 6 serial digits and a check digit")]
    Digits(String),
    /// Check digit does not match.
    #[error(
        "container number {number:?} has check digit {found} but ISO 6346 gives {expected}: check for a typing error"
    )]
    CheckDigit {
        /// The number as given.
        number: String,
        /// The last digit as given.
        found: u32,
        /// The digit computed from the first ten characters.
        expected: u32,
    },
}

/// Numeric value of a letter in ISO 6346: A=10, skipping multiples of 11.
fn letter_value(c: char) -> u32 {
    let mut v = 10;
    let mut l = 'A';
    while l != c {
        v += 1;
        if v % 11 == 0 {
            v += 1;
        }
        l = char::from(l as u8 + 1);
    }
    v
}

/// The check digit of the first ten characters of a container number.
fn check_digit(first10: &str) -> u32 {
    let sum: u32 = first10
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let v = if c.is_ascii_digit() { c.to_digit(10).unwrap_or(0) } else { letter_value(c) };
            v << i
        })
        .sum();
    (sum % 11) % 10
}

/// Validates an ISO 6346 container number (e.g. `CSQU3054383`), including its
/// check digit. Upper case only, no spaces.
pub fn validate(number: &str) -> Result<(), ContainerNumberError> {
    let owned = || number.to_string();
    if number.chars().count() != 11 || !number.is_ascii() {
        return Err(ContainerNumberError::Length(owned()));
    }
    let (prefix, digits) = number.split_at(4);
    let mut p = prefix.chars();
    let owner_ok = p.by_ref().take(3).all(|c| c.is_ascii_uppercase());
    let category_ok = matches!(p.next(), Some('U' | 'J' | 'Z' | 'R'));
    if !owner_ok || !category_ok {
        return Err(ContainerNumberError::Prefix(owned()));
    }
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(ContainerNumberError::Digits(owned()));
    }
    let expected = check_digit(&number[..10]);
    let found = number[10..].parse::<u32>().unwrap_or(u32::MAX);
    if found != expected {
        return Err(ContainerNumberError::CheckDigit { number: owned(), found, expected });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letter_values_skip_multiples_of_eleven() {
        assert_eq!(letter_value('A'), 10);
        assert_eq!(letter_value('B'), 12);
        assert_eq!(letter_value('K'), 21);
        assert_eq!(letter_value('L'), 23);
        assert_eq!(letter_value('V'), 34);
        assert_eq!(letter_value('Z'), 38);
    }

    #[test]
    fn known_numbers_validate() {
        // Published examples of valid numbers.
        for n in ["CSQU3054383", "MSKU9070323", "MSCU1234566", "TGHU9999995"] {
            assert_eq!(validate(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn wrong_check_digit_names_the_right_one() {
        match validate("CSQU3054384") {
            Err(ContainerNumberError::CheckDigit { found: 4, expected: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_numbers_are_refused() {
        assert!(matches!(validate("CSQU305438"), Err(ContainerNumberError::Length(_))));
        assert!(matches!(validate("csqu3054383"), Err(ContainerNumberError::Prefix(_))));
        assert!(matches!(validate("CSQX3054383"), Err(ContainerNumberError::Prefix(_))));
        assert!(matches!(validate("CSQU30543A3"), Err(ContainerNumberError::Digits(_))));
        assert!(matches!(validate("CSQU30543é3"), Err(ContainerNumberError::Length(_))));
    }
}
