/* placeholder translation unit for a module with no sources yet */
typedef int bam_empty_unit;
