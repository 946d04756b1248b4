#!/bin/sh
# The package test inside the provider image under its own systemd (tests/package.rs): run by
# omerta-pkgtest as root with the package disk's mount point as $1. Each step prints
# `OMERTA-STEP <name> ok <seconds>s` or `OMERTA-STEP <name> FAIL` followed by the traced
# commands that led to it; a failed step does not stop the run (each later step says what it
# finds). The guest has no network: everything is local.
D=$1
read -r V V2 < "$D/versions"
OLD=omerta_${V}_amd64.deb
NEW=omerta_${V2}_amd64.deb
export DEBIAN_FRONTEND=noninteractive
LAUNCHER=omerta-launcher.service
ENGINE=omerta-engine.service
fails=0

# step NAME: runs the shell function step_NAME traced, under set -e, in a subshell.
step() {
    t0=$(date +%s)
    out=$( (set -ex; "step_$1") 2>&1)
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "OMERTA-STEP $1 ok $(($(date +%s) - t0))s"
    else
        echo "OMERTA-STEP $1 FAIL (rc $rc after $(($(date +%s) - t0))s)"
        echo "$out" | tail -n 25 | sed "s/^/  $1| /"
        journalctl -q -o short-monotonic -n 15 -u omerta-launcher -u omerta-engine -u 'omertad@*' | cut -c1-400 | sed "s/^/  $1 journal| /"
        fails=$((fails + 1))
    fi
}

# wait_for SECONDS CMD...: CMD succeeds within SECONDS (checked every 0.2 s).
wait_for() {
    { set +x; } 2>/dev/null
    n=$(($1 * 5))
    shift
    while ! "$@" >/dev/null 2>&1; do
        n=$((n - 1))
        [ $n -gt 0 ] || { echo "not within the time: $*"; return 1; }
        sleep 0.2
    done
    set -x
}
mainpid() { systemctl show -p MainPID --value "$1"; }
ctl() { omertactl "$@"; }
# The lines the processes of unit $1 logged since since_now, at priorities $2 (journalctl -p).
journal() { journalctl -q -o cat "_SYSTEMD_UNIT=$1.service" --since "@$(cat /run/pkgtest-since)" -p "$2"; }
since_now() { date +%s > /run/pkgtest-since; sleep 1; }
vm_state() { ctl --json vm show "$1" | grep -o '"state":"[a-z]*"' | head -n 1 | cut -d'"' -f4; }
guest_pid() { ctl --json vm show "$1" | grep -o '"pid":[0-9]*' | head -n 1 | cut -d: -f2; }
# No process of the package's users, none running its programs.
no_process_left() {
    for u in omerta omerta-vmm omerta-mesh; do
        ! pgrep -u "$u" >/dev/null 2>&1 || { echo "a process of $u remains:"; ps -u "$u" -o pid,args; return 1; }
    done
    ! pgrep -f '^/usr/bin/omerta' >/dev/null || { pgrep -af '^/usr/bin/omerta'; return 1; } || false
}
nothing_left_running() {
    no_process_left
    [ -z "$(ip netns list)" ]
    ! nft list tables | grep -q 'inet omerta' || false
    ! ss -xl | grep -q /run/omerta || false
    ! ss -lun | grep -q ':999[89] ' || false
    ! ss -ltn | grep -q ':9617 ' || false
    [ ! -e /run/omerta ]
    [ ! -e /run/omerta-launcher ]
}

step_boot() {
    state=$(systemctl is-system-running --wait || true)
    echo "system: $state"
    systemctl --failed --no-legend
    [ "$state" = running ] || [ "$state" = degraded ]
}

step_install() {
    # The stand-in VMM: the launcher runs the first qemu-system-x86_64 on its PATH, and a
    # nested QEMU under TCG would take this guest's only vCPU.
    mkdir -p /usr/local/bin /root/pkg
    printf '#!/bin/sh\nexec sleep 100000\n' > /usr/local/bin/qemu-system-x86_64
    chmod 755 /usr/local/bin/qemu-system-x86_64
    cp "$D/$OLD" "$D/$NEW" /root/pkg/
    since_now
    apt-get install -y --no-install-recommends "/root/pkg/$OLD" > /root/install.log 2>&1 || { cat /root/install.log; false; }
    [ "$(dpkg-query -W -f '${Version} ${db:Status-Status}' omerta)" = "$V installed" ]
    systemctl is-enabled $LAUNCHER $ENGINE
    systemctl is-active $LAUNCHER $ENGINE
    ! ls /etc/systemd/system/*.wants/ | grep omertad || false
    getent passwd omerta omerta-vmm omerta-mesh
    [ "$(stat -c '%a %U' /var/lib/omerta /var/lib/omerta/images)" = "755 root
755 root" ]
    [ "$(stat -c '%a %U' /var/lib/omerta-mesh)" = "700 omerta-mesh" ]
    [ "$(cat /proc/sys/net/core/rmem_max)" = 4194304 ]
    dpkg-query -W -f '${Conffiles}\n' omerta | grep -q '/etc/omerta/engine.toml'
    # The units that run are the repository's, byte for byte, and verify under this systemd.
    for u in "$D"/units/*.service; do
        cmp "$u" "/usr/lib/systemd/system/${u##*/}"
    done
    systemd-analyze verify --man=no $LAUNCHER $ENGINE omertad@x.service
    # It started cleanly on the example config: no error in its journal.
    wait_for 10 ctl status
    # The launcher keeps the kernel fence for the engine's user.
    nft list table inet omerta | grep -q skuid
    [ -z "$(journal omerta-engine 0..3)" ]
    [ -z "$(journal omerta-launcher 0..3)" ]
}

step_ready() {
    systemctl stop $LAUNCHER
    ! systemctl is-active $ENGINE || false
    # Type=notify: start returns once the engine has said READY=1 (its control socket up);
    # the engine pulls its launcher in (BindsTo=).
    timeout 60 systemctl start $ENGINE
    systemctl is-active $LAUNCHER $ENGINE
    ctl status
}

step_flags() {
    gid=$(getent group omerta-mesh | cut -d: -f3)
    echo "OMERTA_ENGINE_ARGS=--metrics-listen 127.0.0.1:9617 --control-gid $gid" > /etc/omerta/engine.env
    l=$(mainpid $LAUNCHER)
    e=$(mainpid $ENGINE)
    timeout 60 systemctl restart $ENGINE
    [ "$(mainpid $LAUNCHER)" = "$l" ]
    [ "$(mainpid $ENGINE)" != "$e" ]
    tr '\0' ' ' < "/proc/$(mainpid $ENGINE)/cmdline" | grep -q -- "--control-gid $gid"
    [ "$(stat -c %G /run/omerta/engine.sock)" = omerta-mesh ] || { stat /run/omerta/engine.sock; false; }
}

good_config() {
    cat > /etc/omerta/engine.toml <<EOT
[[vm]]
name = "vm0"
handle = "dgram:/run/omerta/vms/vm0.sock"
consumer = ["$1"]
EOT
}

step_reload() {
    cp /etc/omerta/engine.toml /root/engine.toml.example
    since_now
    good_config 203.0.113.7:51820
    systemctl reload $ENGINE
    wait_for 10 sh -c 'omertactl vm list | grep -q "vm0.*running"'
    journal omerta-engine 6 | grep 'configuration reloaded'
    ctl allow list vm0 | grep 203.0.113.7:51820
    # Its allowlist changed by a second reload.
    good_config 203.0.113.8:51821
    systemctl reload $ENGINE
    wait_for 10 sh -c 'omertactl allow list vm0 | grep -q 203.0.113.8:51821'
    ! ctl allow list vm0 | grep 203.0.113.7 || false
    # A file that does not parse changes nothing; the journal says why at warning or above.
    echo 'this is not toml' >> /etc/omerta/engine.toml
    systemctl reload $ENGINE
    wait_for 10 sh -c "journalctl -q -o cat -u omerta-engine --since @$(cat /run/pkgtest-since) -p 4 | grep -q 'running configuration is kept'"
    ctl vm list | grep 'vm0.*running'
    ctl allow list vm0 | grep 203.0.113.8:51821
    good_config 203.0.113.8:51821
}

step_metrics() {
    bash -c 'exec 3<>/dev/tcp/127.0.0.1/9617; printf "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n" >&3; cat <&3' > /root/metrics.txt
    head -n 1 /root/metrics.txt | grep -q ' 200 '
    grep '^omerta_vm_up{vm="vm0"} 1' /root/metrics.txt
}

step_threads() {
    pid=$(mainpid $ENGINE)
    uid=$(id -u omerta)
    n=0
    for t in /proc/"$pid"/task/*; do
        grep -q "^Uid:[[:space:]]*$uid[[:space:]]*$uid[[:space:]]*$uid[[:space:]]*$uid\$" "$t/status" || { cat "$t/status"; false; }
        grep -q '^CapEff:[[:space:]]*0000000000000000$' "$t/status"
        grep -q '^CapPrm:[[:space:]]*0000000000000000$' "$t/status"
        grep -q '^NoNewPrivs:[[:space:]]*1$' "$t/status"
        grep -q '^Seccomp:[[:space:]]*2$' "$t/status"
        n=$((n + 1))
    done
    echo "$n threads, all uid $uid, no capability, seccomp filter mode"
    [ $n -ge 2 ]
}

step_journal() {
    # Each line carries its level: journald files the engine's INFO lines at priority 6 and
    # the failed reload's at 4 (warning) or below.
    j() { journalctl -q -b -o cat _SYSTEMD_UNIT=omerta-engine.service -p "$1"; }
    j 6..6 | grep -q ' INFO '
    ! j 6..6 | grep -v ' INFO ' || false
    j 0..4 | grep ' WARN \| ERROR '
    ! j 0..4 | grep ' INFO ' || false
}

mesh_net() { cat /root/net; }
step_mesh() {
    out=$(runuser -u omerta-mesh -- env OMERTA_HOME=/var/lib/omerta-mesh omerta network create --name t --endpoint 127.0.0.1:9999)
    echo "$out"
    echo "$out" | sed -n 's/^Network ID: //p' > /root/net
    link=$(echo "$out" | grep '^omerta://join/')
    since_now
    timeout 60 systemctl enable --now "omertad@$(mesh_net).service"
    systemctl is-active "omertad@$(mesh_net).service"
    journalctl -q -o cat -u "omertad@$(mesh_net).service" | sed -n 's/^Peer ID: //p' | tail -n 1 > /root/peer
    [ -s /root/peer ]
    # A consumer, as root, on the same machine.
    mkdir -p /root/c
    OMERTA_HOME=/root/c omerta network join "$link"
    OMERTA_HOME=/root/c setsid omertad start --network "$(mesh_net)" --port 9998 --no-provider --dry-run > /root/c.log 2>&1 < /dev/null &
    echo $! > /root/c.pid
    wait_for 10 grep -q 'daemon started' /root/c.log
    ping_provider
}
ping_provider() {
    wait_for 20 sh -c "OMERTA_HOME=/root/c omerta ping --network $(mesh_net) --peer $(cat /root/peer) --timeout 1000"
}

step_restart() {
    k=$(ls /boot/vmlinuz-* | tail -n 1)
    i=$(ls /boot/initrd.img-* | tail -n 1)
    mkdir -p /var/lib/omerta/images/t
    cp "$k" /var/lib/omerta/images/t/vmlinuz
    cp "$i" /var/lib/omerta/images/t/initrd
    chmod 644 /var/lib/omerta/images/t/*
    ctl vm start --kernel /var/lib/omerta/images/t/vmlinuz --initrd /var/lib/omerta/images/t/initrd name=g,consumer=203.0.113.7:51820,boot-timeout=3600
    wait_for 10 sh -c '[ -n "$(omertactl --json vm show g | grep -o "\"pid\":[0-9]*")" ]'
    p=$(guest_pid g)
    echo "$p" > /root/guest.pid
    [ "$(stat -c %U /proc/"$p")" = omerta-vmm ]
    grep -q '^sleep' /proc/"$p"/comm
    l=$(mainpid $LAUNCHER)
    e=$(mainpid $ENGINE)
    since_now
    timeout 60 systemctl restart $ENGINE
    [ "$(mainpid $LAUNCHER)" = "$l" ]
    [ "$(mainpid $ENGINE)" != "$e" ]
    kill -0 "$p"
    wait_for 10 sh -c "[ \"\$(omertactl --json vm show g | grep -o '\"pid\":[0-9]*' | head -n 1)\" = '\"pid\":$p' ]"
    journal omerta-engine 6 | grep 'vm g: restored'
}

step_direct() {
    # Direct mode: the VMM in a network namespace of its own (ip netns, under /run/netns).
    ctl vm start --kernel /var/lib/omerta/images/t/vmlinuz --initrd /var/lib/omerta/images/t/initrd name=d,consumer=203.0.113.7:51820,mode=direct,boot-timeout=3600
    wait_for 10 sh -c '[ -n "$(omertactl --json vm show d | grep -o "\"pid\":[0-9]*")" ]'
    [ -n "$(ip netns list)" ]
    ctl vm remove d
    wait_for 10 sh -c '[ -z "$(ip netns list)" ]'
}

step_upgrade() {
    p=$(cat /root/guest.pid)
    l=$(mainpid $LAUNCHER)
    e=$(mainpid $ENGINE)
    d=$(mainpid "omertad@$(mesh_net).service")
    since_now
    apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold "/root/pkg/$NEW" > /root/upgrade.log 2>&1 || { cat /root/upgrade.log; false; }
    cat /root/upgrade.log
    [ "$(dpkg-query -W -f '${Version} ${db:Status-Status}' omerta)" = "$V2 installed" ]
    kill -0 "$p"
    [ "$(mainpid $LAUNCHER)" = "$l" ]
    grep -q 'launcher still runs the previous version' /root/upgrade.log
    [ "$(mainpid $ENGINE)" != "$e" ]
    systemctl is-active $ENGINE
    wait_for 10 sh -c "omertactl --json vm show g | grep -q '\"pid\":$p'"
    journal omerta-engine 6 | grep 'vm g: restored'
    # The operator's configuration is theirs (the package's example did not change).
    grep -q vm0 /etc/omerta/engine.toml
    # omertad@ was restarted on the new binary and answers.
    [ "$(mainpid "omertad@$(mesh_net).service")" != "$d" ]
    ping_provider
}

step_stop() {
    p=$(cat /root/guest.pid)
    systemctl stop "omertad@$(mesh_net).service" $ENGINE
    # By design the launcher and its guests outlive the engine.
    systemctl is-active $LAUNCHER
    kill -0 "$p"
    systemctl stop $LAUNCHER
    ! kill -0 "$p" 2>/dev/null || false
    kill "$(cat /root/c.pid)" || true
    wait_for 10 sh -c "! kill -0 $(cat /root/c.pid)"
    nothing_left_running
}

step_purge() {
    timeout 60 systemctl start $ENGINE "omertad@$(mesh_net).service"
    ctl vm start --kernel /var/lib/omerta/images/t/vmlinuz --initrd /var/lib/omerta/images/t/initrd name=g2,consumer=203.0.113.7:51820,boot-timeout=3600
    wait_for 10 sh -c '[ -n "$(omertactl --json vm show g2 | grep -o "\"pid\":[0-9]*")" ]'
    dpkg -L omerta > /root/files
    rm -rf /var/lib/omerta/images/t
    apt-get purge -y omerta > /root/purge.log 2>&1 || { cat /root/purge.log; false; }
    cat /root/purge.log
    grep -q "ending the rentals of network $(mesh_net)" /root/purge.log
    grep -q 'stopping the launcher ends' /root/purge.log
    ! dpkg-query -W -f '${db:Status-Status}' omerta 2>/dev/null | grep -q installed || false
    while read -r f; do
        [ -d "$f" ] || [ ! -e "$f" ] || { echo "left behind: $f"; false; }
    done < /root/files
    [ ! -e /etc/omerta ]
    [ ! -e /var/lib/omerta ]
    [ ! -e /var/lib/omerta-mesh ]
    [ -z "$(find /etc/systemd /var/lib/systemd /usr/lib/systemd -name 'omerta-engine*' -o -name 'omerta-launcher*' -o -name 'omertad@*')" ]
    nothing_left_running
    echo "what remains, by Debian's practice: the users"
    getent passwd omerta omerta-vmm omerta-mesh
}

for s in boot install ready flags reload metrics threads journal mesh restart direct upgrade stop purge; do
    step $s
done
echo "--- the units' journals (last lines)"
journalctl -q -o short-monotonic -n 60 -u omerta-launcher -u omerta-engine -u 'omertad@*' | cut -c1-300
exit $fails
