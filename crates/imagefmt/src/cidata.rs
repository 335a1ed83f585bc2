/// A cloud-init NoCloud seed (label `CIDATA`).
#[derive(Debug, Clone, Default)]
pub struct NoCloudSeed {}
