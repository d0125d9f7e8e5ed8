//! The host side of a box's network (issue 11): a race-free lease of a point-to-point
//! link, the veth pair of a container and the tap of a microVM, and the NAT table.
