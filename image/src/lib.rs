//! OCI and Docker images for both boxes (issue 15).
