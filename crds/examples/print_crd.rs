//! Prints the CRD YAML (handy while iterating on the types without building the operator).
fn main() {
    match corvid_crds::crd_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => eprintln!("{e}"),
    }
}
