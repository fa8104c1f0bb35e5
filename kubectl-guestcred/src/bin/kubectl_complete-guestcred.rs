//! `kubectl_complete-guestcred`: kubectl (1.26 or newer) runs it to complete `kubectl
//! guestcred …`, with the words after `guestcred` and the word being completed last. It
//! prints one candidate per line (subcommands, flags, namespaces, VM names, resets), then
//! Cobra's `:<directive>` line.
fn main() {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let rt = kubectl_guestcred::runtime();
    let (candidates, directive) = rt.block_on(kubectl_guestcred::complete::dynamic(&words));
    for c in candidates {
        println!("{c}");
    }
    println!(":{directive}");
}
