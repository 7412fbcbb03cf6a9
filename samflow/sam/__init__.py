import subprocess, sys
subprocess.run([sys.executable, "/tmp/hq_patch.py", "init", sys.argv[1]], check=True)
