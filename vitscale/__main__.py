from vitscale.cli import main

raise SystemExit(main())
