import re, sys
s = open(sys.argv[1]).read()
launch = re.compile(r'(\b[A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(', re.S)
n = [0]
def rep(m):
    n[0] += 1
    name = m.group(1)
    return 'rp_emu_launch("%s", rp_emu_config(%s), %s, ' % (name.replace('"', ''), m.group(2), name)
s = launch.sub(rep, s)
# cudaLaunchKernelEx(&cfg, kernel, args): the emulator's launch, told the kernel's name
launch_ex = re.compile(r'\bcudaLaunchKernelEx\s*\(\s*([^,;]+?)\s*,\s*([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*,')
def rep_ex(m):
    n[0] += 1
    return 'rp_emu_launch_ex(%s, "%s", %s,' % (m.group(1), m.group(2), m.group(2))
s = launch_ex.sub(rep_ex, s)
s, k = re.subn(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;',
               r'\1 *\2 = (\1 *)rp_emu_dyn_smem();', s)
def shdecl(m):
    names = []
    for part in m.group(3).split(','):
        names.append(re.match(r'\s*(\w+)', part).group(1))
    return m.group(0) + ' ' + ' '.join('rp_emu_poison(&%s, sizeof %s, "%s");' % (x, x, x) for x in names)
s, ns = re.subn(r'(?<!extern )__shared__\s+(__align__\(\d+\)\s+)?(\w+)\s+([^;]+);', shdecl, s)
sys.stderr.write('%d static shared decls; ' % ns)
sys.stderr.write('%s: %d launches, %d dynamic smem\n' % (sys.argv[1], n[0], k))
# keep #line info so compiler messages point at the real file
sys.stdout.write('#line 1 "%s"\n' % sys.argv[1] + s)
