# The slurm.conf lines the one-host test cluster (tests/slurm/run.sh) and the
# namespace cluster (tests/cluster/slurm_lib.sh) share: root daemons, our own
# munged socket, no accounting, a fast scheduler loop and quick requeues.
# Sourced; slurm_conf_common MUNGE_SOCKET prints them.
slurm_conf_common() {
    cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start
# again (120 s by default); the main scheduling loop then starts it within
# sched_interval seconds (60 by default).
AuthInfo=socket=$1,cred_expire=5
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
EOF
}
