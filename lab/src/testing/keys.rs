//! The test credentials every suite shares: four ed25519 public keys (three a grant may
//! add, one "added by hand" in the guest) and two real sha512crypt hashes.

/// Public keys, each with its own comment (tests compare comments).
pub const KEY1: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ+B4jIlELcMrHzsE1Ryt7XpT2gUKy/XZ+lbyfbQ9TZh key1@test";
pub const KEY2: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJKojGo/i5K/TGJ8PutquWzCrCg7RrbK5WgjGBkcoBs key2@test";
pub const KEY3: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJa3PH3SleLEIeaV6/YdAeg2y6IwCiDdUdQBQKWyLES0 key3@test";
/// A key a person put into authorized_keys themselves.
pub const HAND: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOimy32Onc7iJCyVgWcE+d/LHx1OCqkqfeeXY5QKiYXE hand@added";

/// A second real sha512crypt hash (`openssl passwd -6`), for rotations from
/// [`super::SHA512`].
pub const SHA512_OTHER: &str = "$6$gcOtherSalt$Dfhoo.Ig5KpAmTILCxhCnH.cnUbciLGe5wzO6JSWH/VywU5AcFbYXOf/krhYB8h4yAwZ.Yyi0FSamGvCY9rWH1";
