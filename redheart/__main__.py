from redheart.cli import main

raise SystemExit(main())
