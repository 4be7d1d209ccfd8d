//! Compiles the C slow paths of the interposed C++ `operator new`/`delete`
//! (src/alloc/cxx_new.c; src/alloc/cxx.rs says why they are C).

fn main() {
    println!("cargo:rerun-if-changed=src/alloc/cxx_new.c");
    cc::Build::new()
        .file("src/alloc/cxx_new.c")
        // Unwind tables and cleanups that run while a C++ exception passes through.
        .flag("-fexceptions")
        .flag("-fvisibility=hidden")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("anyprof_cxx");
}
