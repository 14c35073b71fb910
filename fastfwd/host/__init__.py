"""Host tooling for VM hosts: the bridge VMs sit on, their TAP devices and MACs, and the
kernel neighbour table as an address source for VMs with static addresses.

Each concept has its module: :mod:`.mac`, :mod:`.tap`, :mod:`.links` (bridge link and
addresses), :mod:`.firewall` (our nftables table), :mod:`.dnsmasq` (the DHCP server on the
bridge), :mod:`.bridge` (setup / check / destroy of the whole), :mod:`.neighbours`, and
:mod:`.cli` (the ``fastfwd-bridge`` command). Nothing here is imported by the daemon unless
it turns a host feature on, so pyroute2 is loaded only when needed.
"""
