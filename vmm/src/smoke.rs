//! KVM smoke guest (owned by the lab/doctor work).
