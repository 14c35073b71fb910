"""Host tooling for VM hosts: the bridge VMs sit on, their TAP devices and MACs, and the
kernel neighbour table as an address source for VMs with static addresses.

One concept per module: :mod:`.mac` (deterministic VM MACs), :mod:`.tap` (TAP devices),
:mod:`.links` (the bridge link and its addresses), :mod:`.sysctl`, :mod:`.firewall` (our
nftables table), :mod:`.dnsmasq` (the DHCP server on the bridge), :mod:`.bridge` (setup /
check / destroy of the whole), :mod:`.cli` (the ``fastfwd-bridge`` command),
:mod:`.neighbours` (the neighbour-table address source), and for tests and measurements
:mod:`.lab` (throw-away network namespaces) and :mod:`.testbed` (a VM host built in them).
The daemon imports none of these unless a host feature is turned on.
"""
